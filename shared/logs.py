"""Logging set-up shared by every process: plain lines for people, JSON lines for collectors."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

_CONTEXT_FIELDS = ("job_id", "kind", "tenant", "model", "event_seq")

# The job a task is running, bound once where the task starts: every line logged while it runs
# (in its coroutines and in the threads asyncio.to_thread starts, which copy the context)
# carries it without each call site passing ``extra``.
_job: ContextVar[dict[str, Any] | None] = ContextVar("loomis_job", default=None)


@contextmanager
def job_context(**fields: Any) -> Iterator[None]:
    """Bind ``job_id``, ``kind``, ``tenant`` … for the log lines written inside the block."""
    bound = {**(_job.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _job.set(bound)
    try:
        yield
    finally:
        _job.reset(token)


class JobContextFilter(logging.Filter):
    """Copies the bound job fields onto each record (an explicit ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_job.get() or {}).items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


class _PlainFormatter(logging.Formatter):
    """Plain lines for people, with the job they belong to when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{field}={value}" for field in _CONTEXT_FIELDS
                           if (value := getattr(record, field, None)) is not None)
        return f"{line} [{context}]" if context else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in _CONTEXT_FIELDS:
            if (value := getattr(record, field, None)) is not None:
                payload[field] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def configure_logging(level: str = "INFO", *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(JobContextFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
