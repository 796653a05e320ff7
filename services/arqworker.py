"""arq's worker, made to notice a dead peer in seconds and to outlive a Redis restart.

arq marks a started job with an in-progress key that lives for the job timeout + 10 s and
re-delivers the job only when that key is gone. Loomis' trainings may run for six hours, so
a killed trainer's job sat untouched for six hours. Here the key is a short lease that a
background task renews while the job runs: a job whose worker died is picked up again one
lease after its last renewal, whatever its timeout.

arq also ends the worker on the first Redis error of its polling loop, so a Redis restart
took every worker down with it. Here Redis commands retry with backoff, and a loop
iteration that still fails waits and tries again instead of ending the process.

Both lean on arq's worker internals (``tasks``, ``job_tasks``, ``start_jobs``,
``_poll_iteration``), read from arq 0.28, the version the lock files pin; tests/test_faults.py
checks them against a real Redis, so an upgrade that moves them fails there first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from arq.connections import RedisSettings as ArqRedisSettings
from arq.constants import in_progress_key_prefix
from arq.worker import Worker
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Redis is away (restarting, failing over, loading its data): worth waiting for. WatchError
# is what a transaction reports when its connection dropped while watching a key.
REDIS_UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError, RedisTimeoutError, WatchError, OSError,
)

COMMAND_BACKOFF_BASE_S = 0.1
COMMAND_BACKOFF_CAP_S = 2.0
LOOP_BACKOFF_FIRST_S = 0.5
LOOP_BACKOFF_CAP_S = 10.0


class PatientRetry(Retry):
    """Retry a Redis call with exponential backoff until ``budget_s`` have passed.

    redis-py's own policy counts attempts, and nests: a command retries, and so does the
    connect inside each attempt, so a count meant for 30 s could wait many minutes. A time
    budget nests harmlessly. Refused connections (OSError) count as well: without them a
    command issued while Redis is down fails at once instead of waiting.
    """

    def __init__(self, budget_s: float) -> None:
        super().__init__(
            ExponentialBackoff(cap=COMMAND_BACKOFF_CAP_S, base=COMMAND_BACKOFF_BASE_S), -1)
        self.update_supported_errors([OSError])
        self.budget_s = budget_s

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[[Any], Any]
    ) -> T:
        failures = 0
        first_failure = 0.0
        while True:
            try:
                result = await do()
            except self._supported_errors as error:
                failures += 1
                await fail(error)
                now = time.monotonic()
                if failures == 1:
                    first_failure = now
                    logger.warning("redis unavailable (%s); retrying for up to %.0fs",
                                   error, self.budget_s)
                if now - first_failure >= self.budget_s:
                    raise error
                await asyncio.sleep(self._backoff.compute(failures))
                continue
            if failures:
                logger.warning("redis is back after %.1fs", time.monotonic() - first_failure)
            return result


def resilient_redis_settings(url: str, *, retry_s: float) -> ArqRedisSettings:
    """Connection settings whose commands wait up to ``retry_s`` for Redis to come back.

    A progress event, a lease renewal or a queue poll issued while Redis restarts then
    simply completes late, instead of failing the job it belongs to or ending the worker.
    """
    settings = ArqRedisSettings.from_dsn(url)
    settings.retry = PatientRetry(retry_s)
    # redis-py re-raises, without retrying, any error not also listed here.
    settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
    return settings


class LeasedWorker(Worker):
    """An arq worker whose running jobs hold short, renewed leases, and that waits out Redis."""

    def __init__(self, *args: Any, lease_s: float, lease_renew_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # arq sets every in-progress key to this on start; normally job timeout + 10 s.
        self.in_progress_timeout_s = lease_s
        self.lease_renew_s = lease_renew_s
        self._outage_started: float | None = None
        self._loop_backoff_s = LOOP_BACKOFF_FIRST_S

    async def main(self) -> None:
        renewer = asyncio.create_task(self._renew_leases(), name="lease-renewer")
        try:
            await super().main()
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _renew_leases(self) -> None:
        """Push back the expiry of every job this worker holds, every ``lease_renew_s``."""
        lease_ms = int(self.in_progress_timeout_s * 1000)
        while True:
            await asyncio.sleep(self.lease_renew_s)
            held = list(self.tasks)
            if not held or self._pool is None:
                continue
            try:
                async with self.pool.pipeline(transaction=False) as pipe:
                    for job_id in held:
                        pipe.pexpire(in_progress_key_prefix + job_id, lease_ms)
                    renewed = await pipe.execute()
                for job_id, ok in zip(held, renewed, strict=True):
                    # A job still running here whose key is gone: Redis was away longer
                    # than the lease. Take it back unless another worker already has.
                    if not ok and job_id in self.job_tasks:
                        key = in_progress_key_prefix + job_id
                        if await self.pool.set(key, b"1", px=lease_ms, nx=True):
                            logger.warning("lease of job %s lapsed; reclaimed it", job_id)
                        else:
                            logger.error("lease of job %s lapsed and another worker took "
                                         "the job; both may run it", job_id)
            except REDIS_UNAVAILABLE as exc:
                logger.warning("could not renew job leases (%s); retrying", exc)
            except Exception:  # the renewer must outlive any one failure, or leases lapse
                logger.exception("renewing job leases failed; retrying")

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's, one job at a time, giving back the slot a job took when Redis failed.

        arq counts a job as started before it asks Redis whether it may start it; an error
        there would leak the slot, and a worker of one slot would never start a job again.
        """
        for job_id in job_ids:
            before = self.job_counter
            try:
                await super().start_jobs([job_id])
            except BaseException:
                if job_id.decode() not in self.tasks and self.job_counter > before:
                    self.job_counter -= 1
                    self.sem.release()
                raise
            if self.job_counter >= self.max_jobs:
                return

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except REDIS_UNAVAILABLE as exc:
            now = time.monotonic()
            if self._outage_started is None:
                self._outage_started = now
                logger.warning("redis unavailable (%s: %s); retrying with backoff",
                               type(exc).__name__, exc)
            else:
                logger.warning("redis still unavailable after %.0fs (%s); next try in %.1fs",
                               now - self._outage_started, type(exc).__name__,
                               self._loop_backoff_s)
            await asyncio.sleep(self._loop_backoff_s)
            self._loop_backoff_s = min(self._loop_backoff_s * 2, LOOP_BACKOFF_CAP_S)
            return
        if self._outage_started is not None:
            logger.warning("redis is back after %.1fs",
                           time.monotonic() - self._outage_started)
            self._outage_started = None
            self._loop_backoff_s = LOOP_BACKOFF_FIRST_S


