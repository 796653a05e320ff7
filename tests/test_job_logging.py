"""Every log line written while a job runs names the job, without each call site saying so."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from shared.logs import JobContextFilter, JsonFormatter, _PlainFormatter, job_context


def _lines(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger("loomis.test.joblog")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger, stream, handler


def test_lines_inside_a_job_carry_it_in_coroutines_and_threads() -> None:
    logger, stream, handler = _lines(JsonFormatter())

    async def job() -> None:
        with job_context(job_id="j1", kind="training", tenant="t1"):
            logger.info("in the coroutine")
            await asyncio.to_thread(logger.info, "in a worker thread")
            logger.info("explicit extra wins", extra={"tenant": "other"})
        logger.info("after the job")

    try:
        asyncio.run(job())
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line.get("job_id"), line.get("kind"), line.get("tenant")) for line in lines] == [
        ("j1", "training", "t1"), ("j1", "training", "t1"), ("j1", "training", "other"),
        (None, None, None)]


def test_plain_lines_name_the_job_too() -> None:
    logger, stream, handler = _lines(_PlainFormatter("%(levelname)s %(message)s"))
    try:
        with job_context(job_id="j2", kind="generation"):
            logger.warning("slow step")
        logger.warning("no job")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["WARNING slow step [job_id=j2 kind=generation]",
                                              "WARNING no job"]
