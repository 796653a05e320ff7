"""Switching LoRAs on a warm pipeline vs. reloading the model for each LoRA.

One tiny-sd15 pipeline is loaded through the generator's ``PipelineCache`` and two real LoRA
files (built by ``tests/lora_files.py``) are used alternately, A, B, A, B..., through
``LoraAdapterCache`` and ``render``, as the worker does: each adapter is loaded once and
later requests only ``set_adapters``. The same requests are also run with an unchanged LoRA
(A, A, A...), so the difference of the two medians is the cost of the switch itself; the
switch is also timed alone (``activate`` with no generation). The baseline, measured in the
same run, is the naive way: for each request ``DiffusionPipeline.from_pretrained`` +
``load_lora_weights`` of that request's LoRA + generate.

It also checks what makes switching safe: after all the swaps, a request without LoRA gives
the base image bit for bit (adapters are never fused), and each reuse of A gives A's first
image exactly.

    HF_HUB_OFFLINE=1 python bench/lora_swap.py [--requests 24] [--naive-requests 8]
        [--size 64] [--steps 4] [--threads 1] [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from services.gateway.generations.resolve import resolve_generation  # noqa: E402
from services.generator.loras import LoraAdapterCache, LoraFiles  # noqa: E402
from services.generator.pipelines import PipelineCache  # noqa: E402
from services.generator.render import PreparedInputs, render  # noqa: E402
from services.models.tiny.diffusion import ensure_tiny_model  # noqa: E402
from shared.models import ModelRegistry  # noqa: E402
from shared.specs import GenerationSpec, LoraRef  # noqa: E402
from tests.lora_files import make_lora  # noqa: E402

MODEL = "tiny-sd15"
PROMPT = "a red fox in snow"
SEED = 42


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def quiet() -> None:
    """Progress bars and "no text-encoder LoRA keys" notices would bury the table."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        module.set_verbosity_error()
        module.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated")
    warnings.filterwarnings("ignore", message="Already found a .peft_config. attribute")


def make_loras(model_cache: Path, files: LoraFiles, lora_dir: Path) -> dict[str, LoraRef]:
    """Two different real adapters, stored where the worker's cache and the naive path find them."""
    refs = {}
    lora_dir.mkdir(parents=True, exist_ok=True)
    for name, seed in (("A", 1), ("B", 2)):
        data = make_lora("sd15", cache_dir=model_cache, seed=seed)
        sha = hashlib.sha256(data).hexdigest()
        files.save(sha, data)
        (lora_dir / f"{name}.safetensors").write_bytes(data)
        refs[name] = LoraRef(id=f"lora-{name}", name=name, key=f"loras/{name}.safetensors",
                             sha256=sha, weight=1.0)
    return refs


def naive_request(model_dir: Path, lora_dir: Path, name: str, spec: GenerationSpec) -> tuple[
        np.ndarray, dict[str, float]]:
    """What a service without a pipeline cache does for each request."""
    from diffusers import DiffusionPipeline

    started = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()
    pipe.load_lora_weights(str(lora_dir), weight_name=f"{name}.safetensors", adapter_name=name)
    lora = time.perf_counter()
    with torch.inference_mode():
        image = pipe(prompt=[spec.prompt], negative_prompt=[spec.negative_prompt],
                     num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale,
                     width=spec.width, height=spec.height,
                     generator=[torch.Generator("cpu").manual_seed(SEED)]).images[0]
    done = time.perf_counter()
    return np.asarray(image), {"load": loaded - started, "lora": lora - loaded,
                               "generate": done - lora, "total": done - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=24,
                        help="timed requests per series (switching, same LoRA)")
    parser.add_argument("--naive-requests", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: steadier on a busy 2-core machine)")
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="where tiny models are built/found (default: a temp dir)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    quiet()
    workdir = Path(tempfile.mkdtemp(prefix="loomis-bench-lora-"))
    model_cache = args.model_cache or workdir / "models"
    model_dir = ensure_tiny_model(MODEL, model_cache)
    files = LoraFiles(workdir / "lora-files")
    refs = make_loras(model_cache, files, workdir / "naive-loras")
    registry = ModelRegistry.load()
    spec = resolve_generation(
        GenerationSpec(prompt=PROMPT, model=MODEL, width=args.size, height=args.size,
                       steps=args.steps, seed=SEED),
        registry=registry, default_model=MODEL)
    print(f"{MODEL} at {args.size}x{args.size}, {args.steps} steps, seed {SEED}, "
          f"{args.threads} torch thread(s); model cache {model_cache}")

    loaded = PipelineCache(registry=registry, cache_dir=model_cache, device="cpu").get(MODEL)
    lora_cache = LoraAdapterCache(files)

    def request(names: list[str]) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        result = render(loaded, [spec], [PreparedInputs()], loras=[refs[n] for n in names],
                        lora_cache=lora_cache, on_step=lambda step, total: None)
        return np.asarray(result.images[0]), time.perf_counter() - started

    request([])  # warm-up
    base, _ = request([])
    base_before = [request([])[1] for _ in range(max(3, args.requests // 2))]
    first_use = {}
    for name in ("A", "B"):
        _, first_use[name] = request([name])  # pays load_lora_weights once
    outputs: dict[str, list[np.ndarray]] = {"A": [], "B": []}

    # Requests are classed by whether the previous one had another LoRA. Rounds of X, Y, X then
    # X repeated, X alternating between A and B, so slow drift from other processes hits both
    # series alike.
    switch: list[float] = []
    same: list[float] = []
    previous = "B"
    while len(switch) < args.requests or len(same) < args.requests:
        other = "A" if previous == "B" else "B"
        for name in [other, previous, other, other, other, other]:
            image, seconds = request([name])
            outputs[name].append(image)
            (switch if name != previous else same).append(seconds)
            previous = name

    # The switch alone, no generation: to the other adapter, and to the one already active
    # (``activate`` sets the adapters on every request, changed or not).
    activate: dict[bool, list[float]] = {True: [], False: []}
    with loaded.lock:
        for i in range(2 * args.requests):
            name = "A" if i % 4 < 2 else "B"
            changed = i % 2 == 0
            started = time.perf_counter()
            lora_cache.activate(loaded.pipe, [refs[name]])
            activate[changed].append(time.perf_counter() - started)

    after = []
    base_times = []
    for _ in range(max(3, args.requests // 2)):
        image, seconds = request([])
        after.append(image)
        base_times.append(seconds)

    naive_request(model_dir, workdir / "naive-loras", "A", spec)  # warm-up: imports, file cache
    naive: list[dict[str, float]] = []
    naive_images: dict[str, np.ndarray] = {}
    for i in range(args.naive_requests):
        name = "A" if i % 2 == 0 else "B"
        image, parts = naive_request(model_dir, workdir / "naive-loras", name, spec)
        naive.append(parts)
        naive_images.setdefault(name, image)

    totals = [n["total"] for n in naive]
    print()
    print(f"{'per request (ms)':44} {'p50':>8} {'p90':>8} {'n':>4}")
    rows = [
        ("cached adapters, LoRA switched (A,B,A,B)", switch),
        ("cached adapters, same LoRA as before", same),
        ("no LoRA, before any adapter was loaded", base_before),
        ("no LoRA, adapters loaded and disabled", base_times),
        ("activate alone: to the other LoRA", activate[True]),
        ("activate alone: to the LoRA already active", activate[False]),
        ("naive: from_pretrained + load_lora + gen", totals),
        ("  of which from_pretrained", [n["load"] for n in naive]),
        ("  of which load_lora_weights", [n["lora"] for n in naive]),
        ("  of which generate", [n["generate"] for n in naive]),
    ]
    for label, values in rows:
        print(f"{label:44} {ms(pct(values, .5))} {ms(pct(values, .9))} {len(values):4d}")
    print(f"{'first use of A / B (loads the adapter)':44} {ms(first_use['A'])} {ms(first_use['B'])}")

    switch_cost = pct(switch, .5) - pct(same, .5)
    a_reused = all(np.array_equal(img, outputs["A"][0]) for img in outputs["A"])
    b_reused = all(np.array_equal(img, outputs["B"][0]) for img in outputs["B"])
    base_back = all(np.array_equal(img, base) for img in after)
    lora_moves = not np.array_equal(outputs["A"][0], base) and not np.array_equal(
        outputs["A"][0], outputs["B"][0])
    naive_diff = max(int(np.abs(naive_images[n].astype(int) - outputs[n][0].astype(int)).max())
                     for n in naive_images)

    print()
    print(f"naive p50 / switching p50: {pct(totals, .5) / pct(switch, .5):.1f}x "
          f"(p90: {pct(totals, .9) / pct(switch, .9):.1f}x)")
    print(f"switch cost: {switch_cost * 1000:+.1f} ms as switched minus same-LoRA p50 "
          f"({switch_cost / pct(same, .5) * 100:+.1f}% of a request); activate alone "
          f"{pct(activate[True], .5) * 1000:.1f} ms to the other LoRA, "
          f"{pct(activate[False], .5) * 1000:.1f} ms to the same one")
    print(f"adapter loads: {lora_cache.loads} for {len(switch) + len(same) + 2} LoRA requests")
    print()
    print(f"check: no-LoRA output equals the base bit for bit after {len(switch)} swaps: "
          f"{'yes' if base_back else 'NO'}")
    print(f"check: A's output identical on all {len(outputs['A'])} reuses: {'yes' if a_reused else 'NO'}"
          f" (B's, {len(outputs['B'])}: {'yes' if b_reused else 'NO'})")
    print(f"check: A differs from B and from the base: {'yes' if lora_moves else 'NO'}")
    print(f"check: naive images vs cached-adapter images, max difference {naive_diff} levels")

    print()
    print("summary")
    print(f"  switching LoRA on a warm pipeline: {pct(switch, .5) * 1000:.0f} ms per request (p50), "
          f"naive reload: {pct(totals, .5) * 1000:.0f} ms -> {pct(totals, .5) / pct(switch, .5):.1f}x faster")
    print(f"  the switch itself: {switch_cost * 1000:+.1f} ms in the request medians; activate costs "
          f"{pct(activate[True], .5) * 1000:.1f} ms switching, {pct(activate[False], .5) * 1000:.1f} ms "
          "when the LoRA is unchanged")
    print(f"  no trace left by adapters: {'yes' if base_back else 'NO'}; "
          f"reuse is exact: {'yes' if a_reused and b_reused else 'NO'}")
    if not (base_back and a_reused and b_reused and lora_moves):
        sys.exit(1)


if __name__ == "__main__":
    main()
