"""Throughput of the generator worker's batching of compatible jobs, and its pixel cost.

Starts the real stack (private redis-server, gateway, one generator worker; SQLite and local
storage, the embedded defaults) three times in one run:

    (a) batch_size=1: one job per pipeline call, the baseline
    (b) batch_size=8, batch_exact=true: grouped calls, every model call split per job
    (c) batch_size=8, batch_exact=false: grouped calls, one model call for the group

Each submits N compatible tiny-sd15 jobs at once over HTTP (distinct prompts, seeds
1000+i), a few bursts in a row, waits for all, and reports wall time, jobs/s, end-to-end
latency, how many jobs shared each pipeline call (result.batch_jobs) and the speedup over
(a), medians over the bursts. Then every job's image is downloaded and compared with (a)'s
image for the same seed: (b) must match exactly (the exit status is 1 if it does not).

    python bench/batching.py [--jobs 32] [--repeats 3] [--size 64] [--steps 4]
                             [--batch-size 8] [--window 0.05] [--poll 0.05]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.client import TERMINAL, LoomisClient  # noqa: E402
from services.devstack import Stack, free_port  # noqa: E402

TIMINGS = ("queue_wait_s", "pipeline_s")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def key_for(stack: Stack) -> str:
    import asyncio

    from services.gateway.auth.service import provision_api_key

    url = f"sqlite+aiosqlite:///{(stack.data_dir / 'loomis.db').resolve()}"
    return asyncio.run(provision_api_key(database_url=url, tenant_name="bench"))


def spec_for(index: int, *, size: int, steps: int) -> dict[str, Any]:
    return {"prompt": f"a lighthouse on a cliff, study number {index}", "model": "tiny-sd15",
            "width": size, "height": size, "steps": steps, "seed": 1000 + index}


def submit_all(client: LoomisClient, specs: list[dict[str, Any]],
               poll_s: float) -> tuple[float, list[tuple[float, dict[str, Any]]]]:
    """POST every spec at once, then poll the job list until all have finished.

    Polling one list, not one SSE stream per job: each open stream holds a database
    connection in the gateway (SQLAlchemy's default pool: 5 + 10 overflow), so 32 followers
    starve every other request for the pool's 30 s timeout.
    """
    started = time.perf_counter()
    with ThreadPoolExecutor(len(specs)) as pool:
        ids = list(pool.map(lambda s: client.submit_generation(s)["id"], specs))
    wanted = set(ids)
    done: dict[str, tuple[float, dict[str, Any]]] = {}
    while len(done) < len(ids):
        time.sleep(poll_s)
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = client.http.get("/v1/jobs", params=params)
            page.raise_for_status()
            now = time.perf_counter()
            for job in page.json()["items"]:
                if job["id"] in wanted and job["id"] not in done and job["status"] in TERMINAL:
                    assert job["status"] == "succeeded", job
                    done[job["id"]] = (now - started, job)
            cursor = page.json()["next_cursor"]
            if not cursor:
                break
    return time.perf_counter() - started, [done[job_id] for job_id in ids]


def image_of(job: dict[str, Any]) -> np.ndarray:
    artifact = next(a for a in job["artifacts"] if a["kind"] == "image")
    response = httpx.get(artifact["url"], timeout=30)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(np.int16)


def measure_stack(workdir: Path, model_cache: Path, name: str, env: dict[str, str],
                  args: argparse.Namespace) -> dict[str, Any]:
    stack = Stack(data_dir=workdir / f"stack-{name}", port=free_port(), env={
        "LOOMIS_MODELS__CACHE_DIR": str(model_cache),
        "LOOMIS_GENERATOR__BATCH_WINDOW_S": str(args.window),
        "LOOMIS_LOG_LEVEL": "WARNING",
        **env,
    })
    stack.start()
    walls, done, images = [], [], []
    try:
        client = LoomisClient(stack.url, key_for(stack))
        # Warm-up (model load, first-call costs, the grouped code path): seeds outside the
        # measured range, submitted together so a batching worker groups them.
        warm = [{**spec_for(-1 - i, size=args.size, steps=args.steps), "seed": i}
                for i in range(2)]
        submit_all(client, warm, args.poll)
        specs = [spec_for(i, size=args.size, steps=args.steps) for i in range(args.jobs)]
        for _ in range(args.repeats):
            wall, burst = submit_all(client, specs, args.poll)
            walls.append(wall)
            done.extend(burst)
            images.append({job["spec"]["seed"]: image_of(job) for _, job in burst})
        client.close()
    finally:
        stack.stop()
    results = [job["result"] for _, job in done]
    # One grouped call reports its time on each of its jobs: share it out to count it once.
    pipe_busy = sum(float(r["timings"]["pipeline_s"]) / int(r["batch_jobs"]) for r in results)
    return {
        "walls": walls,
        "e2e": [elapsed for elapsed, _ in done],
        "batch_jobs": [int(r["batch_jobs"]) for r in results],
        "timings": {t: [float(r["timings"].get(t, 0.0)) for r in results] for t in TIMINGS},
        "pipe_share": pipe_busy / sum(walls),
        "images": images,
    }


def distribution(batch_jobs: list[int]) -> str:
    """'8x24 4x8': 24 jobs ran in calls of 8, 8 jobs in calls of 4 (3 + 2 calls)."""
    counts = Counter(batch_jobs)
    calls = sum(round(n / size) for size, n in counts.items())
    return " ".join(f"{size}x{counts[size]}" for size in sorted(counts, reverse=True)) + \
        f" ({calls} calls)"


def max_diff(bursts: list[dict[int, np.ndarray]], reference: dict[int, np.ndarray]) -> int:
    return max(int(np.abs(images[seed] - reference[seed]).max())
               for images in bursts for seed in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="width and height in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3,
                        help="bursts of --jobs per configuration (one stack start); medians")
    parser.add_argument("--batch-size", type=int, default=8, help="for (b) and (c)")
    parser.add_argument("--poll", type=float, default=0.05,
                        help="seconds between polls of the job list (latency resolution)")
    parser.add_argument("--window", type=float, default=0.05,
                        help="LOOMIS_GENERATOR__BATCH_WINDOW_S for every configuration")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="loomis-bench-"))
    model_cache = workdir / "models"
    from services.models.tiny.diffusion import ensure_tiny_model

    ensure_tiny_model("tiny-sd15", model_cache)
    print(f"tiny-sd15 at {args.size}x{args.size}, {args.steps} steps; {args.repeats} bursts of "
          f"{args.jobs} jobs submitted at once per configuration; batch window "
          f"{args.window * 1000:.0f} ms; work dir {workdir}")

    size = str(args.batch_size)
    configs = {
        "(a) batch_size=1": {"LOOMIS_GENERATOR__BATCH_SIZE": "1"},
        f"(b) batch_size={size} exact": {"LOOMIS_GENERATOR__BATCH_SIZE": size,
                                         "LOOMIS_GENERATOR__BATCH_EXACT": "true"},
        f"(c) batch_size={size} inexact": {"LOOMIS_GENERATOR__BATCH_SIZE": size,
                                           "LOOMIS_GENERATOR__BATCH_EXACT": "false"},
    }
    results = {}
    for i, (name, env) in enumerate(configs.items()):
        started = time.perf_counter()
        results[name] = measure_stack(workdir, model_cache, "abc"[i], env, args)
        print(f"  {name}: done in {time.perf_counter() - started:.1f}s (stack start included)")

    base_name = next(iter(results))
    base_wall = statistics.median(results[base_name]["walls"])
    print()
    print(f"{'configuration':26} {'wall':>6} {'jobs/s':>7} {'speedup':>8} {'e2e p50':>8} "
          f"{'e2e p90':>8} {'queue p50':>10} {'pipe p50':>9} {'in pipe':>8}  batch_jobs")
    for name, r in results.items():
        t, wall = r["timings"], statistics.median(r["walls"])
        print(f"{name:26} {wall:6.2f} {args.jobs / wall:7.2f} {base_wall / wall:7.2f}x "
              f"{statistics.median(r['e2e']):8.3f} {pct(r['e2e'], .9):8.3f} "
              f"{statistics.median(t['queue_wait_s']):10.3f} "
              f"{statistics.median(t['pipeline_s']):9.3f} {r['pipe_share']:8.0%}  "
              f"{distribution(r['batch_jobs'])}")
    print(f"(seconds, median of {args.repeats} bursts; wall = the POSTs start until the last job "
          f"is seen finished; e2e = the POSTs start until that job is seen finished, polling "
          f"the job list every {args.poll * 1000:.0f} ms; queue/pipe = the worker's own timings, "
          "pipe being the whole grouped call a job was part of; in pipe = share of wall spent "
          "inside pipeline calls; speedup = wall of (a) / wall; batch_jobs = size x jobs, all "
          "bursts)")
    print()
    reference = results[base_name]["images"][0]
    exact_name, inexact_name = list(results)[1:]
    exact = max_diff(results[exact_name]["images"], reference)
    inexact = max_diff(results[inexact_name]["images"], reference)
    verdict = "PASS" if exact == 0 else "FAIL"
    print(f"pixels vs {base_name}'s first burst, same seed, {args.jobs} x {args.repeats} images "
          f"each (max abs difference, 0-255 levels):")
    if args.repeats > 1:
        same = max_diff(results[base_name]["images"][1:], reference)
        print(f"  {base_name}, later bursts: {same}  (determinism of the baseline itself)")
    print(f"  {exact_name}: {exact}  -> {verdict} (must be 0)")
    print(f"  {inexact_name}: {inexact}  (allowed to drift)")
    if exact != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
