"""LoRA training on tiny-sd15: cached latents, gradient checkpointing, and resuming from a state.

The trainer is the worker's own ``services.trainer.LoraTrainer`` on CPU, trained on
``--images`` synthetic pictures (smooth colour blobs, which a VAE encodes like a picture) at
``--size`` px, batch 2, rank 4, AdamW, a fixed seed. Three things are measured:

1. Seconds per optimizer step with ``cache_latents=True`` (every image VAE-encoded once,
   before the first step) vs. encoding each batch at every step (the baseline, kohya's
   default). Both run in this process, in alternating rounds so that slow drift from other
   processes hits both alike; a step is the gap between two ``on_step`` calls, the first
   ``--warmup`` steps of each run are dropped, and the median is reported. The one-off cost
   of filling the cache is timed too.
2. Peak memory with and without ``gradient_checkpointing``, each variant in a fresh
   subprocess (this script re-invoked with a hidden flag): VmHWM from /proc/self/status after
   training minus VmHWM right after the model is loaded. Where the kernel allows it the
   high-water mark is then reset (``5`` to /proc/self/clear_refs), so the peak of training
   alone above the loaded resident set is shown as well. s/step of each variant is reported.
   The first backward pass of a process touches some 40-65 MiB of torch's library code
   (file-backed RSS, more with checkpointing, whose code path is longer), which would swamp
   the activations at 64 px; so each child first trains 2 steps at 32 px with the same
   setting, and the growth of RssFile during the measured run is shown to be ~0. On a model
   this small the activations that checkpointing drops are a few MiB at 64 px and tens of MiB
   at 256 px; allocator noise is of the same order, and none of it forecasts a real SD1.5 UNet.
3. Resuming vs. starting: a ``--resume-steps`` (K) run saves a state at step K/2 (the path
   comes from ``on_checkpoint``). Then, ``--repeats`` times, a fresh K-step run and a run
   resumed from that state are timed from the trainer's construction (both load the model;
   the resumed one also restores adapter, optimizer, scheduler and RNG state) to their first
   finished step, and to their end: finishing the remaining K/2 steps from the state vs.
   running all K from scratch. The resumed losses are checked against the fresh run's.
4. The cost of ``POST /v1/trainings/plan`` on a ``--plan-images`` dataset (four image shapes,
   several buckets) on a stack of its own, against a GET of the same dataset in the same run.

Load, restore, save and latent-caching times come from a ``LoraTrainer`` subclass that wraps
its private ``_load``, ``_load_state``, ``_save_state`` and ``_cache_latents``.

    HF_HUB_OFFLINE=1 python bench/train.py [--images 8] [--size 64] [--steps 30] [--rounds 3]
        [--warmup 2] [--memory-steps 10] [--memory-runs 2] [--resume-steps 12] [--repeats 3]
        [--plan-images 1000] [--plan-rounds 15] [--threads 1] [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from services.trainer.train import LoraTrainer, TrainConfig, TrainExample  # noqa: E402

MODEL = "tiny-sd15"
SEED = 7
STATUS_KEYS = ("VmHWM", "VmRSS", "RssFile")


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet() -> None:
    """Progress bars and deprecation notices would bury the table."""
    import logging
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        module.set_verbosity_error()
        module.disable_progress_bar()
    logging.getLogger("services.trainer").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated")


def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS and RssFile (its file-backed part) of this process, in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_KEYS:
            values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def make_examples(count: int, size: int) -> list[TrainExample]:
    rng = np.random.default_rng(0)
    examples = []
    for index in range(count):
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
        examples.append(TrainExample(image=image, caption=f"zkw object, colour study {index}"))
    return examples


def config(size: int, steps: int, **overrides: Any) -> TrainConfig:
    options: dict[str, Any] = {"rank": 4, "alpha": 4.0, "learning_rate": 1e-3, "batch_size": 2,
                               "optimizer": "AdamW", "max_train_steps": steps, "seed": SEED,
                               "resolution": size}
    options.update(overrides)
    return TrainConfig(**options)


class TimedTrainer(LoraTrainer):
    """The real trainer, with the moments and durations of its phases recorded."""

    def __init__(self, **kwargs: Any) -> None:
        self.created = time.perf_counter()
        super().__init__(**kwargs)
        self.marks: dict[str, float] = {}
        self.status_after_load: dict[str, int] = {}
        self.peak_reset = False
        self.reset_after_load = False

    def _timed(self, name: str, method: Any, *args: Any) -> Any:
        started = time.perf_counter()
        result = method(*args)
        self.marks[name] = self.marks.get(name, 0.0) + time.perf_counter() - started
        return result

    def _load(self) -> None:
        self._timed("load", super()._load)
        if self.reset_after_load:
            self.status_after_load = proc_status()
            self.peak_reset = reset_peak()

    def _cache_latents(self, examples: Any) -> None:
        self._timed("cache", super()._cache_latents, examples)

    def _load_state(self, *args: Any) -> None:
        self._timed("restore", super()._load_state, *args)

    def _save_state(self, *args: Any) -> Path:
        saved: Path = self._timed("save", super()._save_state, *args)
        return saved


def run(model_dir: Path, examples: list[TrainExample], cfg: TrainConfig, work_dir: Path, *,
        resume_state: Path | None = None, reset_after_load: bool = False) -> dict[str, Any]:
    """One training run; times are from the trainer's construction."""
    step_times: list[float] = []
    states: dict[int, Path] = {}

    def on_checkpoint(step: int, lora: bytes, state_dir: Path | None) -> None:
        if state_dir is not None:
            states[step] = state_dir

    trainer = TimedTrainer(model_dir=model_dir, cfg=cfg, device="cpu")
    trainer.reset_after_load = reset_after_load
    result = trainer.train(examples, work_dir=work_dir,
                           on_step=lambda *_: step_times.append(time.perf_counter()),
                           on_checkpoint=on_checkpoint, resume_state=resume_state)
    done = time.perf_counter()
    start = trainer.created
    return {"first_step": step_times[0] - start, "total": done - start,
            "gaps": list(np.diff(step_times)), "marks": trainer.marks, "states": states,
            "losses": result.losses, "steps": result.steps, "trainer": trainer}


# ---------------------------------------------------------------------- 2: memory, in a child

def memory_child(args: argparse.Namespace) -> None:
    checkpointing = args.memory_child == "on"
    # Touch the library code of a training step (and import what checkpointing needs) with a
    # run too small to leave much heap behind.
    run(args.model_dir, make_examples(2, 32), config(32, 2, gradient_checkpointing=checkpointing),
        Path(tempfile.mkdtemp(prefix="loomis-bench-mem-")))
    examples = make_examples(args.images, args.size)
    cfg = config(args.size, args.memory_steps, gradient_checkpointing=checkpointing)
    result = run(args.model_dir, examples, cfg, Path(tempfile.mkdtemp(prefix="loomis-bench-mem-")),
                 reset_after_load=True)
    trainer = result["trainer"]
    after = proc_status()
    loaded = trainer.status_after_load
    # Without the reset, VmHWM after training would be the larger of the load-time peak and
    # the training peak.
    hwm_end = max(after["VmHWM"], loaded["VmHWM"])
    gaps = result["gaps"][args.warmup:] or result["gaps"]
    out(json.dumps({
        "hwm_growth": hwm_end - loaded["VmHWM"],
        "train_peak_over_rss": after["VmHWM"] - loaded["VmRSS"] if trainer.peak_reset else None,
        "hwm_loaded": loaded["VmHWM"], "rss_loaded": loaded["VmRSS"], "hwm_end": hwm_end,
        "file_growth": after["RssFile"] - loaded["RssFile"],
        "s_per_step": statistics.median(gaps), "load_s": trainer.marks["load"],
    }))


def spawn_memory(variant: str, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", variant,
               "--model-dir", str(model_dir), "--images", str(args.images), "--size", str(args.size),
               "--memory-steps", str(args.memory_steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"memory child ({variant}) failed with exit code {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def plan_zip(count: int) -> bytes:
    """``count`` small PNGs of four shapes (so they fall in several buckets) in ``10_sks dog``."""
    import io
    import zipfile

    shapes = [(64, 64), (64, 128), (128, 64), (96, 64)]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(count):  # each a distinct colour: the upload drops duplicates
            image = Image.new("RGB", shapes[index % len(shapes)],
                              (index % 256, index // 256 % 256, 90))
            png = io.BytesIO()
            image.save(png, format="PNG")
            archive.writestr(f"img/10_sks dog/{index:05d}.png", png.getvalue())
    return buffer.getvalue()


def measure_plan(workdir: Path, images: int, rounds: int) -> dict[str, Any]:
    """POST /v1/trainings/plan on an ``images``-image dataset vs GET of that dataset (the
    baseline: one authenticated read of the same rows), alternating, on a stack of its own
    (gateway and Redis; the plan needs no worker). Wall times per request, from the client."""
    import asyncio

    import httpx

    from services.devstack import Stack, free_port
    from services.gateway.auth.service import provision_api_key

    stack = Stack(data_dir=workdir / "plan-stack", port=free_port(),
                  env={"LOOMIS_LOG_LEVEL": "WARNING"})
    stack.start(worker=False)
    try:
        url = f"sqlite+aiosqlite:///{(stack.data_dir / 'loomis.db').resolve()}"
        key = asyncio.run(provision_api_key(database_url=url, tenant_name="bench"))
        with httpx.Client(base_url=stack.url, timeout=300,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            created = client.post("/v1/datasets", data={"name": "plan", "min_side": "64"},
                                  files=[("zip", ("d.zip", plan_zip(images), "application/zip"))])
            created.raise_for_status()
            dataset_id = created.json()["id"]
            body = {"name": "plan-bench", "base_model": MODEL, "dataset_id": dataset_id,
                    "data": {"resolution": 128, "batch_size": 4, "min_bucket_reso": 64,
                             "max_bucket_reso": 256, "bucket_reso_steps": 64},
                    "optim": {"max_train_epochs": 2}}

            def timed(request: Any) -> tuple[float, httpx.Response]:
                started = time.perf_counter()
                response = request()
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                return elapsed, response

            def get() -> httpx.Response:
                return client.get(f"/v1/datasets/{dataset_id}")

            def plan() -> httpx.Response:
                return client.post("/v1/trainings/plan", json=body)

            timed(get), timed(plan)  # warm-up: imports, connection, caches
            gets, plans = [], []
            for _ in range(rounds):
                gets.append(timed(get)[0])
                elapsed, response = timed(plan)
                plans.append(elapsed)
            result = response.json()
    finally:
        stack.stop()
    return {"get": statistics.median(gets), "plan": statistics.median(plans),
            "images": sum(s["images"] for s in result["subsets"]),
            "buckets": len(result["buckets"]), "total_steps": result["total_steps"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="synthetic training images")
    parser.add_argument("--size", type=int, default=64, help="training resolution in px (64, 256)")
    parser.add_argument("--steps", type=int, default=30,
                        help="steps per run in the cache_latents comparison")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating baseline/cached run pairs in the cache_latents comparison")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run not counted")
    parser.add_argument("--memory-steps", type=int, default=10)
    parser.add_argument("--memory-runs", type=int, default=2,
                        help="subprocesses per gradient-checkpointing variant; medians reported")
    parser.add_argument("--resume-steps", type=int, default=12,
                        help="K: the run length in the resume comparison, the state is saved at K/2")
    parser.add_argument("--repeats", type=int, default=3, help="fresh/resumed run pairs")
    parser.add_argument("--plan-images", type=int, default=1000,
                        help="dataset size for the POST /v1/trainings/plan timing")
    parser.add_argument("--plan-rounds", type=int, default=15,
                        help="alternating dataset GET / plan pairs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: steadier on a busy 2-core machine)")
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="where tiny models are built/found (default: a temp dir)")
    parser.add_argument("--memory-child", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.resume_steps < 2:
        parser.error("--resume-steps must be at least 2")

    torch.set_num_threads(args.threads)
    quiet()
    if args.memory_child:
        memory_child(args)
        return

    from services.models.tiny.diffusion import ensure_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="loomis-bench-train-"))
    model_cache = args.model_cache or workdir / "models"
    model_dir = ensure_tiny_model(MODEL, model_cache)
    examples = make_examples(args.images, args.size)
    steps_per_epoch = -(-args.images // 2)
    out(f"{MODEL} LoRA training on CPU: {args.images} images at {args.size}x{args.size}, batch 2, "
        f"rank 4, AdamW, seed {SEED}, {args.threads} torch thread(s) ({steps_per_epoch} steps per "
        f"epoch); model cache {model_cache}")

    # ------------------------------------------------------------------ 1: cache_latents
    run(model_dir, examples, config(args.size, 3), workdir / "warmup")  # imports, file cache
    gaps: dict[bool, list[float]] = {False: [], True: []}
    first: dict[bool, list[float]] = {False: [], True: []}
    cache_cost: list[float] = []
    losses: dict[bool, list[float]] = {}
    for index in range(args.rounds):
        order = (False, True) if index % 2 == 0 else (True, False)
        for cached in order:
            r = run(model_dir, examples, config(args.size, args.steps, cache_latents=cached),
                    workdir / f"cache-{index}-{cached}")
            gaps[cached].extend(r["gaps"][args.warmup:])
            first[cached].append(r["first_step"])
            losses.setdefault(cached, r["losses"])
            if cached:
                cache_cost.append(r["marks"]["cache"])
    enc = statistics.median(gaps[False])
    cached_step = statistics.median(gaps[True])
    cache_once = statistics.median(cache_cost)
    saved_per_step = enc - cached_step
    # The same latent distribution either way, but one image at a time vs a batch of two
    # through the VAE rounds differently: equal to float32 precision, not bit for bit.
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(losses[False], losses[True], strict=True))
    same_loss = loss_diff < 1e-5

    out()
    out(f"1. cache_latents: {args.rounds} rounds x {args.steps} steps per variant, first "
        f"{args.warmup} of each run dropped")
    out(f"{'':40} {'s/step p50':>10} {'p10':>8} {'p90':>8} {'n':>4} {'to 1st step':>11}")
    for cached, label in ((False, "encode every step (baseline)"), (True, "cache_latents=True")):
        values = sorted(gaps[cached])
        out(f"{label:40} {statistics.median(values):10.4f} {values[len(values) // 10]:8.4f} "
            f"{values[(9 * len(values)) // 10]:8.4f} {len(values):4d} "
            f"{statistics.median(first[cached]):11.3f}")
    out(f"cached vs baseline: {enc / cached_step:.2f}x the step rate "
        f"({saved_per_step * 1000:+.1f} ms per step saved); filling the cache costs "
        f"{cache_once * 1000:.1f} ms once for {args.images} images"
        + (f", repaid after {cache_once / saved_per_step:.1f} steps" if saved_per_step > 0 else ""))
    out(f"check: same losses with and without the cache (same seed), to float32 precision: "
        f"{'yes' if same_loss else 'NO'} (max relative difference {loss_diff:.1e})")

    # ------------------------------------------------------------------ 2: gradient checkpointing
    memory: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for _ in range(args.memory_runs):
        for variant in ("off", "on"):
            memory[variant].append(spawn_memory(variant, args, model_dir))

    def med(variant: str, key: str) -> float:
        values = [r[key] for r in memory[variant] if r[key] is not None]
        return statistics.median(values) if values else float("nan")

    out()
    out(f"2. gradient_checkpointing: {args.memory_runs} fresh subprocess(es) per variant, "
        f"{args.memory_steps} steps each (cache_latents off); MiB, medians")
    out(f"{'':30} {'HWM loaded':>10} {'HWM end':>8} {'HWM growth':>10} {'train peak>RSS':>14} "
        f"{'file RSS +':>10} {'s/step':>8}")
    for variant, label in (("off", "checkpointing off (baseline)"), ("on", "gradient_checkpointing")):
        out(f"{label:30} {mib(med(variant, 'hwm_loaded')):>10} {mib(med(variant, 'hwm_end'))} "
            f"{mib(med(variant, 'hwm_growth')):>10} {mib(med(variant, 'train_peak_over_rss')):>14} "
            f"{mib(med(variant, 'file_growth')):>10} {med(variant, 's_per_step'):8.4f}")
    peak_off, peak_on = med("off", "train_peak_over_rss"), med("on", "train_peak_over_rss")
    growth_off, growth_on = med("off", "hwm_growth"), med("on", "hwm_growth")
    step_ratio = med("on", "s_per_step") / med("off", "s_per_step")
    out("(HWM growth = VmHWM after training - VmHWM after the model load; train peak>RSS = the "
        "peak during training above the RSS after load, VmHWM reset after the load; file RSS + = "
        "file-backed pages (library code) added during training)")
    out(f"checkpointing vs off: HWM growth {(growth_on - growth_off) / 2**20:+.1f} MiB, training "
        f"peak {(peak_on - peak_off) / 2**20:+.1f} MiB, step time {step_ratio:.2f}x")

    # ------------------------------------------------------------------ 3: resume vs start
    k = args.resume_steps
    half = k // 2
    saving = run(model_dir, examples, config(args.size, k, save_state=True, save_every_n_steps=half),
                 workdir / "resume-source")
    state = saving["states"][half]
    fresh: list[dict[str, Any]] = []
    resumed: list[dict[str, Any]] = []
    for index in range(args.repeats):
        fresh.append(run(model_dir, examples, config(args.size, k), workdir / f"fresh-{index}"))
        resumed.append(run(model_dir, examples, config(args.size, k), workdir / f"resumed-{index}",
                           resume_state=state))
    resume_exact = all(r["losses"] == fresh[0]["losses"][half:] for r in resumed)
    from_state_steps = all(r["steps"] == k and len(r["losses"]) == k - half for r in resumed)

    def mid(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def mark(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r["marks"].get(key, 0.0) for r in runs)

    fresh_first, resumed_first = mid(fresh, "first_step"), mid(resumed, "first_step")
    fresh_total, resumed_total = mid(fresh, "total"), mid(resumed, "total")
    out()
    out(f"3. resume vs start: K = {k} steps, state saved at step {half} (writing it took "
        f"{saving['marks']['save'] * 1000:.1f} ms); {args.repeats} fresh/resumed pairs; ms, medians")
    out(f"{'':36} {'to 1st step':>11} {'of which load':>13} {'restore':>8} {'total':>8} {'steps':>6}")
    out(f"{'fresh start (baseline)':36} {ms(fresh_first):>11} {ms(mark(fresh, 'load')):>13} "
        f"{'':>8} {ms(fresh_total)} {k:6d}")
    out(f"{f'resumed from state-{half}':36} {ms(resumed_first):>11} {ms(mark(resumed, 'load')):>13} "
        f"{ms(mark(resumed, 'restore'))} {ms(resumed_total)} {k - half:6d}")
    out(f"resume to first step: {resumed_first / fresh_first:.2f}x a fresh start "
        f"({(resumed_first - fresh_first) * 1000:+.1f} ms; the state restore alone "
        f"{mark(resumed, 'restore') * 1000:.1f} ms)")
    out(f"finishing from the state: {resumed_total / fresh_total:.2f}x the time of all {k} steps "
        f"from scratch ({fresh_total - resumed_total:.2f} s saved)")
    out(f"check: resumed losses equal the uninterrupted run's steps {half + 1}-{k} exactly: "
        f"{'yes' if resume_exact and from_state_steps else 'NO'}")

    plan = measure_plan(workdir, args.plan_images, args.plan_rounds)
    out()
    out(f"4. POST /v1/trainings/plan on a {args.plan_images}-image dataset vs GET of the same "
        f"dataset (baseline); {args.plan_rounds} alternating pairs; ms, medians")
    out(f"{'GET /v1/datasets/{id} (baseline)':36} {ms(plan['get'])}")
    out(f"{'POST /v1/trainings/plan':36} {ms(plan['plan'])}")
    out(f"plan: {plan['images']} images in {plan['buckets']} buckets, {plan['total_steps']} steps; "
        f"{plan['plan'] / plan['get']:.2f}x the dataset GET")

    out()
    out("summary")
    out(f"  cache_latents at {args.size}px: {cached_step * 1000:.1f} ms/step vs {enc * 1000:.1f} ms "
        f"encoding every step -> {enc / cached_step:.2f}x (one-off {cache_once * 1000:.0f} ms)")
    out(f"  gradient_checkpointing: training peak {peak_on / 2**20:.1f} MiB vs {peak_off / 2**20:.1f} "
        f"MiB above the loaded model ({(peak_on - peak_off) / 2**20:+.1f} MiB), "
        f"{step_ratio:.2f}x the step time; on a model this tiny the activations it drops are "
        "small, so this is not a forecast for real SD1.5")
    out(f"  resume: first step after {resumed_first * 1000:.0f} ms vs {fresh_first * 1000:.0f} ms fresh "
        f"({resumed_first / fresh_first:.2f}x); remaining {k - half} steps from the state in "
        f"{resumed_total:.2f} s vs {fresh_total:.2f} s for all {k} ({resumed_total / fresh_total:.2f}x); "
        f"exact resume: {'yes' if resume_exact else 'NO'}")
    out(f"  plan of a {args.plan_images}-image dataset: {plan['plan'] * 1000:.0f} ms vs "
        f"{plan['get'] * 1000:.0f} ms for a GET of it ({plan['plan'] / plan['get']:.2f}x)")
    if plan["images"] != args.plan_images:
        sys.exit(1)
    if not (resume_exact and from_state_steps and same_loss):
        sys.exit(1)


if __name__ == "__main__":
    main()
