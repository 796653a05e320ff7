"""The gateway: FastAPI app factory and its start-up/shut-down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings as ArqRedisSettings
from fastapi import Depends, FastAPI

from services.gateway.auth.service import ApiKeyLookups
from services.gateway.bodylimit import BodyLimit
from services.gateway.compat import a1111, openai_api
from services.gateway.console import routes as console
from services.gateway.control.routes import router as control_router
from services.gateway.datasets.routes import router as datasets_router
from services.gateway.db.reads import Reads
from services.gateway.db.session import WriteLock, make_engine, make_sessionmaker, migrate
from services.gateway.deps import GatewayState, refuse_control_characters_in_url
from services.gateway.docs import install_docs
from services.gateway.events.consumer import EventConsumer
from services.gateway.files.routes import router as files_router
from services.gateway.files.stores import S3Store, build_store
from services.gateway.generations.routes import router as generations_router
from services.gateway.health.routes import router as health_router
from services.gateway.jobs.inserts import JobInserts
from services.gateway.jobs.recovery import QueueRecovery
from services.gateway.jobs.routes import document_event_stream
from services.gateway.jobs.routes import router as jobs_router
from services.gateway.jobs.schemas import document_results
from services.gateway.loras.routes import router as loras_router
from services.gateway.models.routes import router as models_router
from services.gateway.problems import install_problem_handlers
from services.gateway.scenes.jobs import router as scene_jobs_router
from services.gateway.scenes.matching import router as match_router
from services.gateway.scenes.routes import actions_router, places_router
from services.gateway.subjects.chain import SubjectChain
from services.gateway.subjects.routes import router as subjects_router
from services.gateway.sweeps.routes import router as sweeps_router
from services.gateway.taggings.routes import router as taggings_router
from services.gateway.trainings.routes import router as trainings_router
from services.gateway.uploads.routes import router as uploads_router
from services.gateway.webhooks.dispatcher import Dispatcher
from services.gateway.webhooks.routes import job_deliveries_router
from services.gateway.webhooks.routes import router as webhooks_router
from shared.events import JobEvents
from shared.logs import configure_logging
from shared.models import ModelRegistry
from shared.settings import Settings, get_settings

logger = logging.getLogger(__name__)

DESCRIPTION = """
Loomis generates images on GPU workers behind a job queue.

* Authenticate with `Authorization: Bearer <api key>` (`loomis keys create --tenant NAME`).
* Submitting returns **202** with a job; follow it by polling `GET /v1/jobs/{id}`, by
  Server-Sent Events on `GET /v1/jobs/{id}/events` (resumable with `Last-Event-ID`), or by
  webhook (`webhook` in the request, or an endpoint registered with `POST /v1/webhooks`).
* Errors are RFC 9457 `application/problem+json` with a stable `code` and the offending
  `errors[].field`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url, echo=settings.db.echo,
                             pool_size=settings.db.pool_size,
                             max_overflow=settings.db.max_overflow)
        if settings.db.auto_migrate:
            await migrate(engine)
        # a task waits in the queue as long as its job's live state lives (arq's default is a
        # day, after which a worker drops it unrun: a trainer backlog can be longer)
        redis = await create_pool(ArqRedisSettings.from_dsn(settings.redis.url),
                                  expires_extra_ms=settings.redis.job_ttl_s * 1000)
        store = build_store(settings)
        if isinstance(store, S3Store):
            await store.ensure_bucket()
        sessionmaker = make_sessionmaker(engine)
        reads = Reads(engine)
        write_lock = WriteLock(engine)
        job_inserts = JobInserts(engine, write_lock)
        events = JobEvents(redis, stream=settings.redis.events_stream,
                           maxlen=settings.redis.events_maxlen, ttl_s=settings.redis.job_ttl_s)
        dispatcher = Dispatcher(engine=engine, sessionmaker=sessionmaker, store=store,
                                settings=settings.webhooks, write_lock=write_lock)
        app.state.loomis = GatewayState(
            settings=settings,
            registry=ModelRegistry.load(settings.models.models_file,
                                        settings.models.models_dir),
            sessionmaker=sessionmaker, redis=redis, events=events, store=store,
            reads=reads, write_lock=write_lock, job_inserts=job_inserts,
            api_keys=ApiKeyLookups(reads), wake_webhooks=dispatcher.wake,
        )
        chain = SubjectChain(app.state.loomis,
                             sweep_interval_s=settings.gateway.subjects_sweep_interval_s)
        app.state.loomis.wake_subjects = chain.wake
        consumer = EventConsumer(
            redis=redis, sessionmaker=sessionmaker, stream=settings.redis.events_stream,
            group=settings.gateway.consumer_group,
            claim_idle_ms=settings.gateway.consumer_claim_idle_ms,
            batch=settings.gateway.consumer_batch,
            max_attempts=settings.gateway.consumer_max_attempts,
            dead_letter_stream=settings.redis.events_dead_letter_stream, events=events,
            write_lock=app.state.loomis.write_lock,
            webhook_progress_interval_s=settings.webhooks.progress_interval_s,
            on_deliveries=dispatcher.wake, on_subjects=chain.wake,
        )
        recovery = QueueRecovery(app.state.loomis,
                                 interval_s=settings.gateway.queue_recovery_interval_s)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(consumer.run(stop), name="event-consumer"),
                 asyncio.create_task(dispatcher.run(stop), name="webhook-dispatcher"),
                 asyncio.create_task(chain.run(stop), name="subject-chain"),
                 asyncio.create_task(recovery.run(stop), name="queue-recovery")]
        logger.info("gateway ready (consumer %s)", consumer.name)
        try:
            yield
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await redis.aclose()
            await reads.dispose()
            job_inserts.dispose()
            await engine.dispose()

    app = FastAPI(
        title="Loomis",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(refuse_control_characters_in_url)],
        # Checking for OpenTelemetry providers is per request (6% of a poll's CPU); Loomis
        # configures none, so FastAPI's native telemetry runs only when asked for.
        telemetry={"tracing": settings.gateway.telemetry, "metrics": settings.gateway.telemetry,
                   "logs": settings.gateway.telemetry},
    )
    install_problem_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.gateway.max_body_bytes)
    install_docs(app)
    for router in (generations_router, sweeps_router, uploads_router, control_router,
                   loras_router, datasets_router, taggings_router, trainings_router, jobs_router,
                   places_router, match_router, actions_router, scene_jobs_router, models_router,
                   subjects_router,
                   webhooks_router, job_deliveries_router, health_router, files_router):
        app.include_router(router)
    openai_api.install(app)
    a1111.install(app)
    console.install(app)
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_results(document_event_stream(generate_openapi()))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
