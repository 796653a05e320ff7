"""The typed context every worker task reads: the clients built once in arq's startup hook.

arq hands each task a plain dict; ours lives in it under one key (:data:`CONTEXT_KEY`) as a
dataclass, so a task reads ``context.store`` with its type instead of ``ctx["store"]`` and a
misspelt name fails mypy, not a job. arq's own keys (``job_try``, ``enqueue_time``,
``redis``, ``job_id``) stay in the dict, where arq puts them per job.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, fields
from typing import Any, Self

from shared.events import JobEvents
from shared.settings import Settings, get_settings
from shared.storage import LocalStore, ObjectStore, S3Store

CONTEXT_KEY = "loomis"


@dataclass
class WorkerContext:
    settings: Settings
    events: JobEvents
    store: ObjectStore
    worker_name: str
    versions: dict[str, str] = field(default_factory=dict)  # libraries, for manifests

    @classmethod
    def extend(cls, base: WorkerContext, **extra: Any) -> Self:
        """A worker's own context: ``base``'s shared clients plus that worker's fields."""
        return cls(**{f.name: getattr(base, f.name) for f in fields(base)}, **extra)

    @classmethod
    def of(cls, ctx: dict[str, Any]) -> Self:
        """The context startup stored in arq's ``ctx``, checked to be this kind."""
        context = ctx[CONTEXT_KEY]
        if not isinstance(context, cls):
            raise TypeError(f"ctx[{CONTEXT_KEY!r}] is a {type(context).__name__}, not a {cls.__name__}")
        return context


def worker_context(ctx: dict[str, Any]) -> WorkerContext:
    """The context startup stored in arq's ``ctx`` (a worker's own reads ``Kind.of(ctx)``)."""
    return WorkerContext.of(ctx)


def common_context(ctx: dict[str, Any]) -> WorkerContext:
    """The clients every worker shares, built from arq's ``ctx`` in its startup hook.

    ``make_worker`` seeds ``ctx["settings"]`` so the worker and its tasks agree on one
    Settings; without it the environment's are read.
    """
    settings: Settings = ctx.get("settings") or get_settings()
    return WorkerContext(
        settings=settings,
        events=JobEvents(ctx["redis"], stream=settings.redis.events_stream,
                         maxlen=settings.redis.events_maxlen, ttl_s=settings.redis.job_ttl_s),
        store=build_store(settings),
        worker_name=socket.gethostname(),
    )


def build_store(settings: Settings) -> ObjectStore:
    """The workers' store on the configured backend (the gateway builds its own, which also
    takes uploads as files and signs download links: ``services/gateway/files/stores.py``)."""
    cfg = settings.storage
    if cfg.backend == "s3":
        return S3Store(
            bucket=cfg.bucket,
            endpoint_url=cfg.endpoint_url,
            region=cfg.region,
            access_key_id=cfg.access_key_id.get_secret_value() if cfg.access_key_id else None,
            secret_access_key=(
                cfg.secret_access_key.get_secret_value() if cfg.secret_access_key else None
            ),
            create_bucket=cfg.create_bucket,
        )
    return LocalStore(settings.storage_root)
