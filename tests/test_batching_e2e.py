"""Worker batching: compatible queued jobs share one pipeline call without changing pixels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RunningStack, S3Server, launch_stack, wait_terminal
from tests.test_modes_e2e import BASE, images_of


@pytest.fixture(scope="module")
def batching_stack(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server,
                   model_cache: Path) -> Iterator[RunningStack]:
    tmp = tmp_path_factory.mktemp("batching")
    running = launch_stack(tmp, database_url=f"sqlite+aiosqlite:///{tmp / 'loomis.db'}",
                           s3=s3_server, model_cache=model_cache,
                           extra_env={"LOOMIS_GENERATOR__BATCH_SIZE": "4",
                                      "LOOMIS_GENERATOR__BATCH_WINDOW_S": "0.5"})
    yield running
    running.stack.stop()
    running.redis.stop()


def test_grouped_jobs_keep_their_pixels(batching_stack: RunningStack) -> None:
    specs = [{**BASE, "prompt": f"boat number {i}", "seed": 500 + i} for i in range(4)]
    with batching_stack.client() as client:
        alone = []
        for spec in specs[:2]:  # one at a time: each runs in its own pipeline call
            job = wait_terminal(client, client.post("/v1/generations", json=spec).json()["id"])
            assert job["result"]["batch_jobs"] == 1
            alone.append(images_of(job)[0])
        ids = [client.post("/v1/generations", json=spec).json()["id"] for spec in specs]
        other = client.post("/v1/generations", json={**BASE, "steps": 2}).json()["id"]
        jobs = [wait_terminal(client, job_id) for job_id in ids]
        assert max(job["result"]["batch_jobs"] for job in jobs) > 1, [j["result"] for j in jobs]
        grouped = [images_of(job)[0] for job in jobs]
        diffs = [int(np.abs(g.astype(int) - a.astype(int)).max())
                 for g, a in zip(grouped[:2], alone, strict=True)]
        assert diffs == [0, 0], (diffs, [j["result"]["batch_jobs"] for j in jobs])
        assert [job["result"]["seeds"] for job in jobs] == [[500], [501], [502], [503]]
        # An incompatible job (other steps) is never grouped with them.
        assert wait_terminal(client, other)["result"]["batch_jobs"] == 1
