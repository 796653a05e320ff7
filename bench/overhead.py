"""Service overhead of Loomis vs. the old one-subprocess-per-job approach.

Starts the real stack (private redis-server, gateway, one generator worker; SQLite and
local storage, the embedded defaults), submits jobs over HTTP with the tiny model at 1
step, and reports end-to-end latency, the part of it that is service overhead (end-to-end
minus the worker's measured pipeline time) and throughput. The baseline, measured in the
same run, is what the old application did per job: a fresh Python process that loads the
pipeline, generates and writes the PNG.

    python bench/overhead.py [--jobs 30] [--baseline-jobs 5] [--poll-delays 0.05,0.5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.client import LoomisClient  # noqa: E402
from services.devstack import Stack, free_port  # noqa: E402

SPEC = {"prompt": "a red fox in snow", "model": "tiny-sd15", "steps": 1, "width": 64,
        "height": 64}

BASELINE = """
import sys, time, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
image = pipe("a red fox in snow", num_inference_steps=1, width=64, height=64,
             generator=torch.Generator().manual_seed(int(sys.argv[3]))).images[0]
image.save(sys.argv[2])
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def key_for(stack: Stack) -> str:
    import asyncio

    from services.gateway.auth.service import provision_api_key

    url = f"sqlite+aiosqlite:///{(stack.data_dir / 'loomis.db').resolve()}"
    return asyncio.run(provision_api_key(database_url=url, tenant_name="bench"))


def one_job(client: LoomisClient, seed: int) -> tuple[float, float]:
    started = time.perf_counter()
    job = client.submit_generation({**SPEC, "seed": seed})
    job = client.wait(job["id"])
    elapsed = time.perf_counter() - started
    assert job["status"] == "succeeded", job
    return elapsed, float(job["result"]["timings"]["pipeline_s"])


def measure_stack(workdir: Path, model_cache: Path, poll_delay: float, jobs: int) -> dict:
    stack = Stack(data_dir=workdir / f"stack-{poll_delay}", port=free_port(), env={
        "LOOMIS_MODELS__CACHE_DIR": str(model_cache),
        "LOOMIS_GENERATOR__POLL_DELAY_S": str(poll_delay),
        "LOOMIS_LOG_LEVEL": "WARNING",
    })
    stack.start()
    try:
        client = LoomisClient(stack.url, key_for(stack))
        for seed in range(3):  # warm-up: first requests pay connection and import costs
            one_job(client, seed)
        e2e, pipe = [], []
        for seed in range(jobs):
            total, pipeline = one_job(client, 100 + seed)
            e2e.append(total)
            pipe.append(pipeline)
        overhead = [t - p for t, p in zip(e2e, pipe, strict=True)]
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda s: one_job(client, s), range(1000, 1000 + jobs)))
        throughput = jobs / (time.perf_counter() - started)
        client.close()
    finally:
        stack.stop()
    return {"e2e": e2e, "pipeline": pipe, "overhead": overhead, "jobs_per_s": throughput}


def measure_baseline(model_dir: Path, workdir: Path, runs: int) -> list[float]:
    times = []
    for seed in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", BASELINE, str(model_dir),
                        str(workdir / f"baseline-{seed}.png"), str(seed)],
                       check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--baseline-jobs", type=int, default=5)
    parser.add_argument("--poll-delays", default="0.05,0.5",
                        help="worker queue poll intervals to compare (arq's default is 0.5)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="loomis-bench-"))
    model_cache = workdir / "models"
    from services.models.tiny.diffusion import ensure_tiny_model

    model_dir = ensure_tiny_model("tiny-sd15", model_cache)
    print(f"tiny-sd15 at 64x64, 1 step; {args.jobs} jobs per configuration; work dir {workdir}")

    results = {float(p): measure_stack(workdir, model_cache, float(p), args.jobs)
               for p in args.poll_delays.split(",")}
    baseline = measure_baseline(model_dir, workdir, args.baseline_jobs)

    print()
    print(f"{'configuration':34} {'e2e p50':>9} {'e2e p95':>9} {'overhead p50':>13} "
          f"{'overhead p95':>13} {'pipeline p50':>13} {'jobs/s':>8}")
    for poll, r in results.items():
        print(f"{f'loomis, worker poll {poll * 1000:.0f} ms':34} {pct(r['e2e'], .5):9.3f} "
              f"{pct(r['e2e'], .95):9.3f} {pct(r['overhead'], .5):13.3f} "
              f"{pct(r['overhead'], .95):13.3f} {pct(r['pipeline'], .5):13.3f} "
              f"{r['jobs_per_s']:8.2f}")
    print(f"{'baseline: subprocess per job':34} {pct(baseline, .5):9.3f} {pct(baseline, .95):9.3f} "
          f"{'':>13} {'':>13} {'':>13} {1 / statistics.mean(baseline):8.2f}")
    print()
    for poll, r in results.items():
        print(f"poll {poll * 1000:.0f} ms: end-to-end p50 is {pct(baseline, .5) / pct(r['e2e'], .5):.1f}x "
              f"faster than the baseline; throughput {r['jobs_per_s'] * statistics.mean(baseline):.1f}x")
    print("(seconds; e2e = POST until the job is seen finished over SSE; overhead = e2e minus "
          "the worker's pipeline time; jobs/s with 8 concurrent clients and one worker)")


if __name__ == "__main__":
    main()
