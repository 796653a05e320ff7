"""Compatibility adapters: the latency the OpenAI Images and AUTOMATIC1111 APIs add over the
native API for the same tiny-model request, measured in the same run.

Starts everything itself: moto's S3 server, a private redis-server and a stack (gateway and
generator worker) on a SQLite file, with the model cache in a temporary folder unless
``--model-cache`` names one. One request, four ways, each timed from the client's call to the
image in the client's hands (tiny-sd15, 64x64, ``STEPS`` steps, the preset's
guidance and scheduler):

- native, SSE: ``POST /v1/generations``, ``GET /v1/jobs/{id}/events`` until the terminal
  event, ``GET /v1/jobs/{id}`` for the artifact's presigned URL, and the PNG from it (the
  stream's terminal event is written to SQL before it is sent, so the GET agrees with it);
- native, polling: ``POST /v1/generations``, ``GET /v1/jobs/{id}`` every ``POLL_S`` until
  terminal (the answer carries the presigned URL), and the PNG from it;
- ``openai``: the official client's ``images.generate(response_format="b64_json")`` with
  ``quality="low"`` (half tiny-sd15's 4 default steps: ``STEPS``), the image base64-decoded;
- ``webuiapi``: the client's ``txt2img`` (``sampler=None``: the model's own scheduler, as the
  others use), its first image (the client base64-decodes the PNGs into PIL images itself).

Every client keeps its connections alive (httpx for the native calls and the presigned
download, the ``openai`` client's own httpx, ``webuiapi``'s requests session). The native
calls and ``webuiapi`` send the round's seed; the OpenAI API has no seed, so its jobs draw
one. After ``--warmup`` rounds, ``--runs`` rounds each run the four once, in an order
shuffled per round (seeded), so drift and the worker's state fall on all four alike. Per
series it prints p50/p90 of the wall time and, from each request's job
(``created_at``, ``finished_at``; the openai jobs are found by the ``user``
each request names), the p50 of: submit (client start to the job's row), the job (row to
``finished_at``), after (``finished_at`` to the image in hand) and the two outside the job
(submit + after). Last, the added latency of each adapter: its p50 minus the faster native
p50, and the ratio, and the same difference for the time outside the job (the job's own time
varies with the CPU the clients and the gateway take from the worker); and checks that every
job rendered the same request (steps, size, guidance, scheduler) and that, with one seed per
round, the polling and webuiapi images equal native SSE's pixel for pixel.

    python bench/compat.py [--runs 15] [--warmup 2] [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchstack import bench_stack  # noqa: E402

MODEL = "tiny-sd15"
SIZE = 64
STEPS = 2  # OpenAI's quality="low" on tiny-sd15: half its 4 default steps
PROMPT = "a red fox in snow"
SEED = 4242
POLL_S = 0.02
TERMINAL = ("succeeded", "failed", "canceled")
SERIES = ("native, SSE", "native, polling 20 ms", "openai images.generate", "webuiapi txt2img")


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_time(value: str) -> datetime:
    """The API's RFC 3339 times; SQLite hands back naive UTC, which is UTC all the same."""
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def check(response: Any, expected: int) -> dict[str, Any]:
    if response.status_code != expected:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                           f"{response.status_code} {response.text[:2000]}")
    body: dict[str, Any] = response.json()
    return body


@dataclass
class Sample:
    """One request: its wall time, when it started and ended (wall clock), the image and the
    job that rendered it (its id, or the ``user`` that finds it)."""

    series: str
    wall: float
    started: datetime
    ended: datetime
    image: Any  # PNG bytes, or the PIL image webuiapi hands back
    seed: int | None
    job_id: str | None = None
    user: str | None = None


class Clients:
    def __init__(self, url: str, key: str) -> None:
        import httpx
        import openai
        import webuiapi

        self.native = httpx.Client(base_url=url, timeout=60,
                                   headers={"Authorization": f"Bearer {key}"})
        self.storage = httpx.Client(timeout=60)  # presigned URLs: the signature is the credential
        self.openai = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
        where = urlparse(url)
        self.webui = webuiapi.WebUIApi(host=where.hostname, port=where.port, sampler=None,
                                       steps=STEPS)
        self.webui.set_auth("bench", key)

    def close(self) -> None:
        self.native.close()
        self.storage.close()
        self.openai.close()


def native_spec(seed: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "model": MODEL, "width": SIZE, "height": SIZE, "steps": STEPS,
            "seed": seed}


def image_of(clients: Clients, job: dict[str, Any]) -> bytes:
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {json.dumps(job.get('error'))}")
    artifact = next(a for a in job["artifacts"] if a["kind"] == "image")
    response = clients.storage.get(artifact["url"])
    response.raise_for_status()
    return response.content


def native_sse(clients: Clients, seed: int) -> tuple[bytes, str]:
    from httpx_sse import connect_sse

    job = check(clients.native.post("/v1/generations", json=native_spec(seed)), 202)
    with connect_sse(clients.native, "GET", f"/v1/jobs/{job['id']}/events") as source:
        for sse in source.iter_sse():
            if sse.data and json.loads(sse.data)["status"] in TERMINAL:
                break
    return image_of(clients, check(clients.native.get(f"/v1/jobs/{job['id']}"), 200)), job["id"]


def native_poll(clients: Clients, seed: int) -> tuple[bytes, str]:
    job = check(clients.native.post("/v1/generations", json=native_spec(seed)), 202)
    deadline = time.perf_counter() + 120
    while job["status"] not in TERMINAL:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"job {job['id']} still {job['status']} after 120 s")
        time.sleep(POLL_S)
        job = check(clients.native.get(f"/v1/jobs/{job['id']}"), 200)
    return image_of(clients, job), job["id"]


def openai_generate(clients: Clients, user: str) -> bytes:
    result = clients.openai.images.generate(model=MODEL, prompt=PROMPT, size=f"{SIZE}x{SIZE}",
                                            quality="low", response_format="b64_json", user=user)
    return base64.b64decode(result.data[0].b64_json or "")  # type: ignore[index]


def webui_txt2img(clients: Clients, seed: int) -> tuple[Any, str]:
    """The client decodes the base64 PNGs into PIL images itself: its first one."""
    result = clients.webui.txt2img(prompt=PROMPT, seed=seed, steps=STEPS, cfg_scale=7.5,
                                   width=SIZE, height=SIZE)
    return result.image, result.info["loomis_job_ids"][0]


def one(clients: Clients, series: str, seed: int) -> Sample:
    """One request of ``series``; the native ones and webuiapi's send ``seed``."""
    user, job_id = None, None
    image: Any
    started_at = datetime.now(UTC)
    t0 = time.perf_counter()
    if series == SERIES[0]:
        image, job_id = native_sse(clients, seed)
    elif series == SERIES[1]:
        image, job_id = native_poll(clients, seed)
    elif series == SERIES[2]:
        user = f"bench-{uuid.uuid4().hex[:12]}"
        image = openai_generate(clients, user)
    else:
        image, job_id = webui_txt2img(clients, seed)
    wall = time.perf_counter() - t0
    return Sample(series, wall, started_at, datetime.now(UTC), image,
                  None if user else seed, job_id, user)


def attach_jobs(clients: Clients, samples: list[Sample]) -> dict[int, dict[str, Any]]:
    """Every sample's job as ``GET /v1/jobs/{id}`` reads it, keyed by ``id(sample)``; the
    openai ones found by their ``user`` in ``GET /v1/jobs``."""
    by_user: dict[str, str] = {}
    cursor = None
    while True:
        page = check(clients.native.get("/v1/jobs", params={"limit": 100, **(
            {"cursor": cursor} if cursor else {})}), 200)
        for job in page["items"]:
            user = (job["spec"].get("compat") or {}).get("user")
            if user:
                by_user[user] = job["id"]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    jobs = {}
    for sample in samples:
        job_id = sample.job_id or by_user[sample.user or ""]
        jobs[id(sample)] = check(clients.native.get(f"/v1/jobs/{job_id}"), 200)
    return jobs


def report(samples: list[Sample],
           jobs: dict[int, dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Prints each series' wall and its split; returns the p50 walls and the p50s of the time
    outside the job (submit + after)."""
    print(f"\n{'':24} {'p50':>9} {'p90':>9} {'min':>9} {'max':>9}   | p50 of: {'submit':>8} "
          f"{'job':>8} {'after':>8} {'outside':>8}")
    p50s, outside = {}, {}
    for series in SERIES:
        own = [s for s in samples if s.series == series]
        walls = [s.wall for s in own]
        split: dict[str, list[float]] = {"submit": [], "job": [], "after": [], "outside": []}
        for s in own:
            job = jobs[id(s)]
            created, finished = parse_time(job["created_at"]), parse_time(job["finished_at"])
            split["submit"].append((created - s.started).total_seconds())
            split["job"].append((finished - created).total_seconds())
            split["after"].append((s.ended - finished).total_seconds())
            split["outside"].append(split["submit"][-1] + split["after"][-1])
        p50s[series] = percentile(walls, 50)
        outside[series] = percentile(split["outside"], 50)
        row = " ".join(f"{v * 1000:6.1f} ms" for v in (
            percentile(walls, 50), percentile(walls, 90), min(walls), max(walls)))
        parts = " ".join(f"{percentile(v, 50) * 1000:5.1f} ms" for v in split.values())
        print(f"{series:24} {row}   |         {parts}")
    return p50s, outside


def same_work(samples: list[Sample], jobs: dict[int, dict[str, Any]]) -> list[str]:
    """Problems, if any job rendered something else than the native request."""
    import numpy as np
    from PIL import Image

    def pixels(image: Any) -> Any:
        opened = Image.open(io.BytesIO(image)) if isinstance(image, bytes) else image
        return np.asarray(opened.convert("RGB"))

    problems = []
    keys = ("model", "width", "height", "steps", "guidance_scale", "scheduler", "num_images",
            "mode")
    reference = None
    for s in samples:
        spec = jobs[id(s)]["spec"]
        seen = {k: spec.get(k) for k in keys}
        if reference is None:
            reference = seen
        elif seen != reference:
            problems.append(f"{s.series}: {seen} != {reference}")
        if pixels(s.image).shape != (SIZE, SIZE, 3):
            problems.append(f"{s.series}: a {pixels(s.image).shape} image")
    native = {s.seed: pixels(s.image) for s in samples if s.series == SERIES[0]}
    for s in samples:
        if s.series in (SERIES[1], SERIES[3]) and not np.array_equal(pixels(s.image),
                                                                     native[s.seed]):
            problems.append(f"{s.series}, seed {s.seed}: pixels differ from native SSE's")
    return problems


def bench(args: argparse.Namespace, workdir: Path) -> int:
    from shared.settings import CompatSettings

    rng = random.Random(args.runs)
    samples: list[Sample] = []
    model_cache = (args.model_cache or workdir / "models").resolve()
    with bench_stack(workdir, model_cache=model_cache, worker=True) as running:
        stack, key = running.stack, running.key
        print(f"{MODEL}, {SIZE}x{SIZE}, {STEPS} steps, the preset's guidance and scheduler; "
              f"{args.warmup} warm-up round(s), then {args.runs} rounds of the four in a shuffled "
              f"order; SQLite, S3 on moto; {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f}; adapters wait up to {CompatSettings().wait_s:g} s",
              flush=True)
        clients = Clients(stack.url, key)
        try:
            for round_ in range(args.warmup):
                for series in SERIES:
                    one(clients, series, SEED - 1 - round_)
            for round_ in range(args.runs):
                order = list(SERIES)
                rng.shuffle(order)
                for series in order:
                    samples.append(one(clients, series, SEED + round_))
            jobs = attach_jobs(clients, samples)
        finally:
            clients.close()

    p50s, outside = report(samples, jobs)
    print("  submit: client start to the job's row (created_at); job: created_at to finished_at "
          "(queue, run, events); after: finished_at to the image in the client's hands; "
          "outside: submit + after")
    native_name = min(SERIES[:2], key=lambda s: p50s[s])
    native = p50s[native_name]
    print(f"\nadded latency, p50 adapter - p50 {native_name} (the faster native path by p50, "
          f"{native * 1000:.1f} ms); beside it the same for the time outside the job, which "
          "the job's own variation (CPU shared with the clients) does not blur:")
    for series in SERIES[2:]:
        print(f"  {series:24} {(p50s[series] - native) * 1000:+7.1f} ms   "
              f"{p50s[series] / native:5.2f} x     outside the job "
              f"{(outside[series] - outside[native_name]) * 1000:+6.1f} ms "
              f"({outside[series] * 1000:.1f} ms against {outside[native_name] * 1000:.1f} ms)")
    problems = same_work(samples, jobs)
    print("same request rendered by every job (model, size, steps, guidance, scheduler); "
          "the polling and webuiapi images equal native SSE's pixel for pixel (one seed per "
          "round): "
          + ("yes" if not problems else "NO\n  " + "\n  ".join(problems)))
    print(f"load average now {os.getloadavg()[0]:.2f}")
    return 0 if not problems else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="timed rounds of the four")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="where tiny models are built/found (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loomis-bench-compat-") as tmp:
        return bench(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
