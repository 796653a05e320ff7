"""SD1.5, SDXL and Flux at their real sizes (random weights): load time, step time, peak memory.

Each model is built once per machine from its real component configs
(``services/generator/realsize.py``: SD1.5 860M-parameter UNet + VAE + CLIP ViT-L/14; SDXL
2.6B UNet + CLIP-L + OpenCLIP bigG; FLUX.1 12B MMDiT + CLIP-L + T5-XXL), then loaded by the
generator's own ``PipelineCache`` (the path a worker takes: ``from_pretrained``, device and
dtype policy, the weights hash) and asked for images. Every model runs in a fresh child
process, so its load time and peak RSS are its own.

Baselines measured in the same run: SD1.5 for every other model (load, step and memory
ratios), and for each model its warm image against a fresh process's first one (load +
first image), which is what keeping a model loaded saves.

On CPU (default) each model does one small step (``--size 64``, ``--steps 1``) in float32,
the worker's CPU policy; a model whose float32 weights would not fit in the memory available
runs in bfloat16 instead (said in the table), and one that fits in neither is reported as
skipped with the bytes it needs. FLUX.1 (~12B + 4.7B parameters) does not fit a 24 GB machine
even in bfloat16.

With ``--device cuda`` it runs the published workloads and compares s/image with the targets
(set for an H100): SD1.5 512x512 50 steps <= 0.40 s, SDXL 1024x1024 30 steps <= 2.4 s,
FLUX.1-dev 1024x1024 28 steps <= 3.5 s, in the presets' precisions (float16, float16,
bfloat16), no CPU offload, the median of ``--repeats`` images after a warm-up.

    HF_HUB_OFFLINE=1 python bench/real_models.py [--device cpu|cuda] [--models sd15,sdxl,flux-dev]
        [--size 64] [--steps 1] [--repeats 3] [--cache-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024 ** 3
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
FAMILY = {"sd15": "sd15", "sdxl": "sdxl", "flux-dev": "flux", "flux-schnell": "flux"}
# (size, steps, target s/image on an H100, preset dtype on a GPU)
GPU_WORKLOADS: dict[str, tuple[int, int, float, str]] = {
    "sd15": (512, 50, 0.40, "float16"),
    "sdxl": (1024, 30, 2.4, "float16"),
    "flux-dev": (1024, 28, 3.5, "bfloat16"),
    "flux-schnell": (1024, 4, 3.5 * 4 / 28, "bfloat16"),
}
DISK_DTYPE_BYTES = {"sd15": 2, "sdxl": 2, "flux-dev": 2, "flux-schnell": 2}


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet() -> None:
    """Progress bars and deprecation notices would bury the table."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        module.set_verbosity_error()
        module.disable_progress_bar()
    warnings.filterwarnings("ignore")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def parameter_count(kind: str) -> int:
    """Parameters of a model's components, from its configs, built on the meta device."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from services.generator.realsize import CONFIG_MODELS, CONFIGS, SD15_TEXT_CONFIG, SD15_UNET_CONFIG

    if kind == "sd15":
        with init_empty_weights():
            unet = diffusers.UNet2DConditionModel(**SD15_UNET_CONFIG)
            text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT_CONFIG))
        return sum(p.numel() for m in (unet, text) for p in m.parameters()) + 83_653_863
    config = CONFIGS / CONFIG_MODELS[kind][0]
    index = json.loads((config / "model_index.json").read_text())
    total = 0
    for name, entry in index.items():
        if not isinstance(entry, list) or entry[0] is None or "Token" in entry[1] \
                or "Scheduler" in entry[1]:
            continue
        cls = getattr(diffusers if entry[0] == "diffusers" else transformers, entry[1])
        with init_empty_weights():
            model = (cls.from_config(cls.load_config(config / name)) if entry[0] == "diffusers"
                     else cls(cls.config_class.from_pretrained(config / name)))
        total += sum(p.numel() for p in model.parameters())
    return total


def plan(kind: str, device: str) -> dict[str, Any]:
    """Whether the model can be built and run here, in which precision, and why not."""
    from services.generator.realsize import find_real_sd15, realsize_cache_dir

    params = parameter_count(kind)
    available = mem_available()
    # Activations, the process itself, and room for whatever else runs on the machine.
    margin = 4 * GIB
    name = f"{kind}-realsize-v1"
    built = (find_real_sd15() is not None if kind == "sd15"
             else (realsize_cache_dir() / name / "build.json").exists())
    result: dict[str, Any] = {"model": kind, "parameters": params, "available": available}
    if device != "cpu":
        result["dtype"] = GPU_WORKLOADS[kind][3]
        return result
    if not built and params * DISK_DTYPE_BYTES[kind] + margin > available:
        result["skipped"] = (f"building needs ~{(params * 2 + margin) / GIB:.0f} GiB of memory, "
                             f"{available / GIB:.0f} GiB available")
        return result
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        if params * size + margin <= available:
            result["dtype"] = dtype
            return result
    result["skipped"] = (f"needs ~{(params * 2 + margin) / GIB:.0f} GiB in bfloat16 "
                         f"({params * 4 / GIB:.0f} GiB in float32), "
                         f"{available / GIB:.0f} GiB available")
    return result


def child(kind: str, *, device: str, dtype: str, size: int, steps: int, repeats: int,
          cache_dir: Path | None) -> dict[str, Any]:
    """Build (if needed), load through PipelineCache, draw images; in this fresh process."""
    import torch

    quiet()
    from services.generator import pipelines
    from services.generator.pipelines import PipelineCache
    from services.generator.realsize import ensure_real_model, realsize_cache_dir
    from shared.models import ModelPreset, ModelRegistry

    started = time.perf_counter()
    model = ensure_real_model(kind, cache_dir)
    ready_s = time.perf_counter() - started
    build = model.build_info()
    if device == "cpu" and dtype != "float32":
        # The worker runs float32 on CPUs; only this benchmark overrides it, so a model whose
        # float32 weights would not fit this machine still runs through the same loader.
        pipelines.pick_dtype = lambda _preset, _device: getattr(torch, dtype)  # type: ignore[assignment]
    family = FAMILY[kind]
    preset = ModelPreset(name=f"{kind}-realsize", family=family, source=str(model.folder),
                         dtype=dtype, cpu_offload=False)
    worker_cache = (cache_dir or realsize_cache_dir()) / "worker-cache"
    cache = PipelineCache(registry=ModelRegistry([preset]), cache_dir=worker_cache, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    started = time.perf_counter()
    loaded = cache.get(preset.name)
    sync()
    load_s = time.perf_counter() - started
    pipe = loaded.pipeline_for("txt2img")
    guidance = preset.limits.default_guidance if kind != "flux-schnell" else 0.0
    kwargs: dict[str, Any] = {"prompt": PROMPT, "num_inference_steps": steps, "width": size,
                              "height": size, "guidance_scale": guidance}
    if family == "flux":
        kwargs["max_sequence_length"] = 512 if kind == "flux-dev" else 256

    def image() -> float:
        begin = time.perf_counter()
        with torch.inference_mode():
            pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0))
        sync()
        return time.perf_counter() - begin

    first_s = image()
    warm = [image() for _ in range(repeats)]
    result = {
        "model": kind, "device": device, "dtype": loaded.dtype, "size": size, "steps": steps,
        "guidance": guidance, "parameters": sum(build["parameters"].values()),
        "folder_bytes": build["folder_bytes"], "build_s": build["build_s"],
        "built_now": ready_s > 5, "load_s": load_s, "first_image_s": first_s,
        "warm_image_s": statistics.median(warm),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "weight_bytes": loaded.weight_bytes(),
    }
    if device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result


def run_child(kind: str, args: argparse.Namespace, dtype: str, size: int, steps: int) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", kind, "--device", args.device, "--dtype", dtype,
            "--size", str(size), "--steps", str(steps), "--repeats", str(args.repeats)]
    if args.cache_dir:
        argv += ["--cache-dir", str(args.cache_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"model": kind, "failed": f"exit {done.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def report(results: list[dict[str, Any]], device: str) -> None:
    baseline = next((r for r in results if r["model"] == "sd15" and "load_s" in r), None)
    out(f"{'model':<13} {'params':>7} {'dtype':<9} {'size':>5} {'steps':>5} {'load s':>7} "
        f"{'1st img s':>9} {'warm s':>7} {'peak RSS':>9} {'vs SD1.5 load/step/RSS':>23} "
        f"{'fresh/warm':>10}")
    for r in results:
        if "load_s" not in r:
            out(f"{r['model']:<13} {r.get('parameters', 0) / 1e9:>6.2f}B  "
                f"{'skipped: ' + r['skipped'] if 'skipped' in r else r['failed']}")
            continue
        versus = ""
        if baseline is not None and r is not baseline:
            versus = (f"{r['load_s'] / baseline['load_s']:.1f}x/"
                      f"{r['warm_image_s'] / baseline['warm_image_s']:.1f}x/"
                      f"{r['peak_rss_bytes'] / baseline['peak_rss_bytes']:.1f}x")
        fresh = (r["load_s"] + r["first_image_s"]) / r["warm_image_s"]
        out(f"{r['model']:<13} {r['parameters'] / 1e9:>6.2f}B {r['dtype']:<9} {r['size']:>5} "
            f"{r['steps']:>5} {r['load_s']:>7.1f} {r['first_image_s']:>9.2f} "
            f"{r['warm_image_s']:>7.2f} {r['peak_rss_bytes'] / GIB:>7.1f}Gi {versus:>23} "
            f"{fresh:>9.1f}x")
    built = [r for r in results if r.get("built_now")]
    for r in built:
        out(f"  built {r['model']} now: {r['build_s']:.0f} s, {r['folder_bytes'] / GIB:.1f} GiB on disk")
    if device.startswith("cuda"):
        out()
        for r in results:
            if "warm_image_s" not in r:
                continue
            target = GPU_WORKLOADS[r["model"]][2]
            verdict = "meets" if r["warm_image_s"] <= target else "misses"
            out(f"  {r['model']}: {r['warm_image_s']:.2f} s/image on {r.get('gpu')} "
                f"(peak {r.get('peak_gpu_bytes', 0) / GIB:.1f} GiB); target <= {target:.2f} s on "
                f"an H100: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", default=None,
                        help="comma-separated, from sd15, sdxl, flux-dev, flux-schnell "
                        "(default: sd15,sdxl,flux-dev)")
    parser.add_argument("--size", type=int, default=None, help="CPU image side (default 64)")
    parser.add_argument("--steps", type=int, default=None, help="CPU steps (default 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="warm images timed per model (default: 1 on CPU, 3 on a GPU)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the models are built (default: ~/.cache/loomis/realsize)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    if args.repeats is None:
        args.repeats = 3 if gpu else 1
    if args.child:
        result = child(args.child, device=args.device, dtype=args.dtype, size=args.size,
                       steps=args.steps, repeats=args.repeats, cache_dir=args.cache_dir)
        out(json.dumps(result))
        return
    kinds = (args.models or "sd15,sdxl,flux-dev").split(",")
    quiet()
    out(f"real-size models on {args.device}, random weights, built once into "
        f"{args.cache_dir or '~/.cache/loomis/realsize'}")
    results: list[dict[str, Any]] = []
    for kind in kinds:
        decision = plan(kind, args.device)
        if "skipped" in decision:
            results.append(decision)
            out(f"  {kind}: skipped: {decision['skipped']}")
            continue
        size, steps = ((GPU_WORKLOADS[kind][0], GPU_WORKLOADS[kind][1]) if gpu
                       else (args.size or 64, args.steps or 1))
        out(f"  {kind}: {decision['parameters'] / 1e9:.2f}B parameters, {decision['dtype']}, "
            f"{size}x{size}, {steps} step(s) ...")
        results.append(run_child(kind, args, decision["dtype"], size, steps))
    out()
    report(results, args.device)
    if args.json:
        out(json.dumps(results))


if __name__ == "__main__":
    main()
