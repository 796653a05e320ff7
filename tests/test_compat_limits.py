"""The adapters' edges on a stack of their own: a wait that runs out (504 naming the job,
which keeps running), credential-less AUTOMATIC1111 for a configured tenant, and OpenAI
options that must change what happens."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import openai
import pytest
import webuiapi
from PIL import Image

from tests.conftest import RunningStack, S3Server, launch_stack, wait_terminal
from tests.test_compat_openai import picture, png


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server,
               model_cache: Path) -> Iterator[RunningStack]:
    tmp = tmp_path_factory.mktemp("compat")
    running = launch_stack(tmp, database_url=f"sqlite+aiosqlite:///{tmp / 'loomis.db'}",
                           s3=s3_server, model_cache=model_cache, extra_env={
                               "LOOMIS_COMPAT__WAIT_S": "4",
                               "LOOMIS_COMPAT__A1111_OPEN": "true",
                               "LOOMIS_COMPAT__A1111_TENANT": "alice"})
    yield running
    running.stack.stop()
    running.redis.stop()


def test_a_wait_that_runs_out_is_a_504_naming_the_job(slow_stack: RunningStack) -> None:
    client = openai.OpenAI(base_url=f"{slow_stack.url}/v1", api_key=slow_stack.keys["alice"],
                           max_retries=2)
    with slow_stack.client() as http:  # the one generator is busy for far longer than the wait
        blocker = http.post("/v1/generations", json={
            "prompt": "busy", "model": "tiny-sd15", "width": 1024, "height": 1024,
            "steps": 150}).json()["id"]
    with pytest.raises(openai.InternalServerError) as raised:
        client.images.generate(model="tiny-sd15", prompt="slow", size="64x64")
    with slow_stack.client() as http:
        http.post(f"/v1/jobs/{blocker}/cancel")
    error = raised.value
    assert error.status_code == 504 and error.response.headers["x-should-retry"] == "false"
    job_id = str(error.body["message"]).split("/v1/jobs/")[1].split(";")[0].split(" ")[0]  # type: ignore[index]
    with slow_stack.client() as http:
        jobs = http.get("/v1/jobs", params={"limit": 10}).json()["items"]
        assert len([j for j in jobs if j["spec"].get("compat")]) == 1  # not retried
        assert job_id != blocker
        assert wait_terminal(http, job_id, timeout=300)["status"] == "succeeded"  # not lost


def test_open_a1111_implies_the_configured_tenant(slow_stack: RunningStack) -> None:
    url = urlparse(slow_stack.url)
    api = webuiapi.WebUIApi(host=url.hostname, port=url.port, steps=2)  # no credentials
    result = api.txt2img(prompt="a dot", width=64, height=64, steps=2, seed=4)
    job_id = result.info["loomis_job_ids"][0]
    with slow_stack.client("alice") as alice, slow_stack.client("bob") as bob:
        assert alice.get(f"/v1/jobs/{job_id}").status_code == 200
        assert bob.get(f"/v1/jobs/{job_id}").status_code == 404
    # the OpenAI routes still need a key
    anonymous = httpx.post(f"{slow_stack.url}/v1/images/generations", json={"prompt": "x"})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"


def test_openai_options_change_what_happens(slow_stack: RunningStack) -> None:
    client = openai.OpenAI(base_url=f"{slow_stack.url}/v1", api_key=slow_stack.keys["alice"],
                           max_retries=0)
    ten = client.images.generate(model="tiny-sd15", prompt="dots", n=10, size="64x64",
                                 output_format="webp", output_compression=40)
    assert len(ten.data) == 10  # two jobs: 8 + 2, one seed sequence
    first = Image.open(io.BytesIO(base64.b64decode(ten.data[0].b64_json or "")))
    assert first.format == "WEBP"
    vivid = client.images.generate(model="tiny-sd15", prompt="dots", size="64x64",
                                   style="vivid", quality="hd")
    natural = client.images.generate(model="tiny-sd15", prompt="dots", size="60x60",
                                     style="natural", quality="low")
    assert natural.size == "64x64"  # snapped to the family's multiple of 8
    with slow_stack.client() as http:
        jobs = http.get("/v1/jobs", params={"limit": 4}).json()["items"]
        natural_job, vivid_job = jobs[0], jobs[1]
        assert vivid_job["spec"]["guidance_scale"] == natural_job["spec"]["guidance_scale"] + 2
        assert vivid_job["spec"]["steps"] > natural_job["spec"]["steps"]
        seeds = [j["spec"]["seed"] for j in jobs[2:4]]
        assert seeds[0] == seeds[1] + 8  # the second job continues the first's seeds
    edits = client.images.edit(model="tiny-sd15", prompt="x",
                               image=[("a.png", png(picture()), "image/png"),
                                      ("b.png", png(picture(32)), "image/png")])
    assert len(edits.data) == 1  # the first image (sent as image[]) is edited: img2img
    _ = vivid
