"""Deriving img2img, inpaint and ControlNet pipelines from the loaded model vs. loading each one.

After a txt2img image on tiny-sd15, each further mode is asked for in turn: img2img, inpaint
with the base model's own UNet (the fallback), inpaint with the dedicated tiny-sd15-inpaint
UNet, and txt2img with a canny ControlNet. Two approaches, each in fresh subprocesses so
their memory is measured alone:

* derived: the generator's ``PipelineCache.get`` then ``LoadedModel.pipeline_for(mode, ...)``,
  which builds each pipeline with ``from_pipe`` over the base's modules and loads only the
  companions (the ControlNet, the inpainting UNet), once;
* separate (the baseline): ``from_pretrained`` of each pipeline on its own:
  ``DiffusionPipeline``, ``AutoPipelineForImage2Image``, ``AutoPipelineForInpainting`` (base
  directory), ``StableDiffusionInpaintPipeline`` (inpaint directory) and
  ``StableDiffusionControlNetPipeline`` with ``ControlNetModel.from_pretrained``.

Per mode it reports time to first image (getting the pipeline + its first generation, the
median over ``--repeats`` subprocess pairs). For memory, the bytes of the distinct parameter
and buffer tensors (by data pointer) held by all pipelines at the end, which is exact and is
what a GPU would hold, and what the process's resident set grew by (VmRSS and its parts from
/proc/self/status, Pss from /proc/self/smaps_rollup), which is what the OS sees but includes
allocator noise and, on CPU, counts mmapped weight files once per mapping. Both approaches
run the same calls with the same seeds, so their images are also compared.

    HF_HUB_OFFLINE=1 python bench/pipeline_cache.py [--size 64|256] [--steps 3] [--repeats 3]
        [--threads 1] [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "tiny-sd15"
INPAINT = "tiny-sd15-inpaint"
CANNY = "tiny-sd15-controlnet-canny"
PROMPT = "a red fox in snow"
SEED = 42
MODES = ["txt2img", "img2img", "inpaint, base UNet", "inpaint, dedicated UNet", "controlnet canny"]
MIB = 1024 * 1024


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def quiet() -> None:
    """Progress bars and deprecation notices would bury the table."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for module in (diffusers_logging, transformers_logging):
        module.set_verbosity_error()
        module.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated")


def proc_status() -> dict[str, int]:
    """Memory figures of this process in bytes: VmRSS, RssAnon, RssFile, VmHWM from
    /proc/self/status, and Pss from /proc/self/smaps_rollup.

    Weights loaded from safetensors on CPU stay mmapped from the file (RssFile): a file
    mapped twice counts twice in RSS but is in RAM once, which Pss (pages divided by their
    mapping count) shows.
    """
    values = {"Pss": 0}
    for source in ("status", "smaps_rollup"):
        path = Path("/proc/self") / source
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM", "Pss"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def held_bytes(pipes: list[Any]) -> dict[str, int]:
    """Parameter and buffer bytes held by ``pipes``: distinct storages, and counted per pipeline."""
    import torch

    distinct: dict[int, int] = {}
    per_pipeline = 0
    modules: set[int] = set()
    for pipe in pipes:
        for component in pipe.components.values():
            if not isinstance(component, torch.nn.Module):
                continue
            modules.add(id(component))
            for tensor in itertools.chain(component.parameters(), component.buffers()):
                size = tensor.numel() * tensor.element_size()
                per_pipeline += size
                distinct[tensor.data_ptr()] = max(size, distinct.get(tensor.data_ptr(), 0))
    return {"distinct": sum(distinct.values()), "per_pipeline": per_pipeline,
            "modules": len(modules)}


def scene(size: int) -> Any:
    """A deterministic picture with hard edges, so canny has something to find."""
    from PIL import Image, ImageDraw

    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(image)
    s = size / 64
    draw.ellipse((8 * s, 10 * s, 36 * s, 38 * s), fill=(200, 60, 40))
    draw.rectangle((30 * s, 30 * s, 56 * s, 54 * s), fill=(40, 90, 200))
    draw.line((0, 60 * s, size, 4 * s), fill=(250, 250, 250), width=max(1, round(2 * s)))
    return image


def run_child(approach: str, model_cache: Path, size: int, steps: int) -> dict[str, Any]:
    """One approach, every mode in order, in this (fresh) process."""
    import numpy as np
    import torch
    from diffusers import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        ControlNetModel,
        DiffusionPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionInpaintPipeline,
    )
    from PIL import Image

    from services.generator.control import canny
    from services.generator.pipelines import PipelineCache
    from shared.models import ModelRegistry

    init = scene(size)
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    control = canny(init)
    common = {"prompt": PROMPT, "negative_prompt": "", "num_inference_steps": steps,
              "guidance_scale": 7.5}
    call_args: dict[str, dict[str, Any]] = {
        "txt2img": {"width": size, "height": size},
        "img2img": {"image": init, "strength": 0.75},
        "inpaint, base UNet": {"image": init, "mask_image": mask, "width": size, "height": size},
        "inpaint, dedicated UNet": {"image": init, "mask_image": mask, "width": size,
                                    "height": size},
        "controlnet canny": {"image": control, "width": size, "height": size},
    }
    dtype = torch.float32
    base_dir, inpaint_dir, canny_dir = (model_cache / name for name in (MODEL, INPAINT, CANNY))
    loaded: Any = None

    def base() -> Any:
        nonlocal loaded
        loaded = PipelineCache(registry=ModelRegistry.load(), cache_dir=model_cache,
                               device="cpu").get(MODEL)
        return loaded.pipe

    def separate(load: Callable[[], Any]) -> Callable[[], Any]:
        def get() -> Any:
            pipe = load()
            pipe.set_progress_bar_config(disable=True)
            return pipe
        return get

    acquire: dict[str, Callable[[], Any]]
    if approach == "derived":
        acquire = {
            "txt2img": base,
            "img2img": lambda: loaded.pipeline_for("img2img"),
            "inpaint, base UNet": lambda: loaded.pipeline_for("inpaint", dedicated_inpaint=False),
            "inpaint, dedicated UNet": lambda: loaded.pipeline_for("inpaint"),
            "controlnet canny": lambda: loaded.pipeline_for("txt2img", ("canny",)),
        }
    else:
        acquire = {
            "txt2img": separate(lambda: DiffusionPipeline.from_pretrained(base_dir, torch_dtype=dtype)),
            "img2img": separate(lambda: AutoPipelineForImage2Image.from_pretrained(
                base_dir, torch_dtype=dtype)),
            "inpaint, base UNet": separate(lambda: AutoPipelineForInpainting.from_pretrained(
                base_dir, torch_dtype=dtype)),
            "inpaint, dedicated UNet": separate(lambda: StableDiffusionInpaintPipeline.from_pretrained(
                inpaint_dir, torch_dtype=dtype)),
            "controlnet canny": separate(lambda: StableDiffusionControlNetPipeline.from_pretrained(
                base_dir, torch_dtype=dtype,
                controlnet=ControlNetModel.from_pretrained(canny_dir, torch_dtype=dtype))),
        }

    before = proc_status()
    pipes: list[Any] = []
    modes: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        started = time.perf_counter()
        pipe = acquire[mode]()
        got = time.perf_counter()
        with torch.inference_mode():
            image = pipe(**common, **call_args[mode],
                         generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
        done = time.perf_counter()
        pipes.append(pipe)
        pixels = np.asarray(image)
        modes[mode] = {"acquire": got - started, "generate": done - got, "total": done - started,
                       "pipeline": type(pipe).__name__,
                       "image": hashlib.sha256(pixels.tobytes()).hexdigest()[:16]}
        if mode == "txt2img":  # both approaches are the same up to here
            first = proc_status()
            first_held = held_bytes(pipes)["distinct"]
    after = proc_status()
    return {
        "modes": modes,
        "memory": {**held_bytes(pipes), "added": held_bytes(pipes)["distinct"] - first_held,
                   "VmRSS_growth": after["VmRSS"] - before["VmRSS"],
                   **{f"{key}_added": after[key] - first[key]
                      for key in ("VmRSS", "RssAnon", "RssFile", "Pss")},
                   "peak_growth": after["VmHWM"] - before["VmRSS"]},
        "companion_loads": loaded.derived_loads if approach == "derived" else None,
    }


def spawn(approach: str, args: argparse.Namespace, model_cache: Path) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", approach,
               "--model-cache", str(model_cache), "--size", str(args.size),
               "--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"{approach} run failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (64, 256)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3,
                        help="subprocess pairs; times and RSS are the median over them")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: steadier on a busy 2-core machine)")
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="where tiny models are built/found (default: a temp dir)")
    parser.add_argument("--child", choices=["derived", "separate"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    quiet()
    if args.child:
        result = run_child(args.child, args.model_cache, args.size, args.steps)
        out(json.dumps(result))
        return

    from services.models.tiny.diffusion import ensure_tiny_model
    from services.models.weights import weights_hash

    model_cache = args.model_cache or Path(tempfile.mkdtemp(prefix="loomis-bench-pipes-")) / "models"
    for name in (MODEL, INPAINT, CANNY):
        ensure_tiny_model(name, model_cache)
    weights_hash(model_cache / MODEL, model_cache / ".hashes")  # a one-off the cache pays at first
    out(f"{MODEL} at {args.size}x{args.size}, {args.steps} steps, seed {SEED}, {args.threads} torch "
        f"thread(s), {args.repeats} subprocess(es) per approach; model cache {model_cache}")

    runs: dict[str, list[dict[str, Any]]] = {"derived": [], "separate": []}
    for repeat in range(args.repeats):  # alternate who goes first: drift hits both alike
        order = ["derived", "separate"] if repeat % 2 == 0 else ["separate", "derived"]
        for approach in order:
            runs[approach].append(spawn(approach, args, model_cache))

    def med(approach: str, mode: str, key: str) -> float:
        return statistics.median(run["modes"][mode][key] for run in runs[approach])

    def med_sum(approach: str, key: str) -> float:
        return statistics.median(sum(run["modes"][m][key] for m in MODES) for run in runs[approach])

    def mem(approach: str, key: str) -> float:
        return statistics.median(run["memory"][key] for run in runs[approach]) / MIB

    out()
    out("time to first image, ms (median): getting the pipeline + generating")
    out(f"{'mode':25} {'derived get':>11} {'+ image':>8} {'= total':>8} {'separate get':>12} "
        f"{'+ image':>8} {'= total':>8} {'sep/der':>8} {'same px':>8}")
    for mode in MODES:
        same = all(run["modes"][mode]["image"] == runs["derived"][0]["modes"][mode]["image"]
                   for run in runs["derived"] + runs["separate"])
        cells = [med(a, mode, k) * 1000 for a in ("derived", "separate")
                 for k in ("acquire", "generate", "total")]
        out(f"{mode:25} {cells[0]:11.1f} {cells[1]:8.1f} {cells[2]:8.1f} {cells[3]:12.1f} "
            f"{cells[4]:8.1f} {cells[5]:8.1f} {cells[5] / cells[2]:7.1f}x {'yes' if same else 'NO':>8}")
    derived_all = [med_sum("derived", k) * 1000 for k in ("acquire", "generate", "total")]
    separate_all = [med_sum("separate", k) * 1000 for k in ("acquire", "generate", "total")]
    out(f"{'all five, in order':25} {derived_all[0]:11.1f} {derived_all[1]:8.1f} {derived_all[2]:8.1f} "
        f"{separate_all[0]:12.1f} {separate_all[1]:8.1f} {separate_all[2]:8.1f} "
        f"{separate_all[2] / derived_all[2]:7.1f}x")
    after_first = [sum(med(a, m, "acquire") for m in MODES[1:]) * 1000 for a in ("derived", "separate")]
    out(f"getting the four pipelines after txt2img: derived {after_first[0]:.1f} ms, separate "
        f"{after_first[1]:.1f} ms ({after_first[1] / after_first[0]:.0f}x)")
    pipelines = {a: ", ".join(runs[a][0]["modes"][m]["pipeline"] for m in MODES) for a in runs}
    out(f"pipelines: {pipelines['derived']}")
    if pipelines["separate"] != pipelines["derived"]:
        out(f"  separate: {pipelines['separate']}")

    out()
    out("memory, MiB: parameters+buffers held by all five pipelines (distinct tensors, and counted")
    out("per pipeline), and what the four modes after txt2img added (RSS: median over runs)")
    out(f"{'approach':10} {'held':>7} {'per pipeline':>13} {'modules':>8} {'added':>7} "
        f"{'VmRSS added':>12} {'RssAnon':>8} {'RssFile':>8} {'Pss added':>10} {'VmRSS since imports':>20} "
        f"{'peak':>7}")
    for approach in ("derived", "separate"):
        modules = runs[approach][0]["memory"]["modules"]
        out(f"{approach:10} {mem(approach, 'distinct'):7.2f} {mem(approach, 'per_pipeline'):13.2f} "
            f"{modules:8d} {mem(approach, 'added'):7.2f} {mem(approach, 'VmRSS_added'):12.1f} "
            f"{mem(approach, 'RssAnon_added'):8.1f} {mem(approach, 'RssFile_added'):8.1f} "
            f"{mem(approach, 'Pss_added'):10.1f} {mem(approach, 'VmRSS_growth'):20.1f} "
            f"{mem(approach, 'peak_growth'):7.1f}")
    param_ratio = mem("separate", "distinct") / mem("derived", "distinct")
    added_ratio = mem("separate", "added") / mem("derived", "added")
    rss_ratio = mem("separate", "VmRSS_added") / mem("derived", "VmRSS_added")
    rss_spread = {a: [round(r["memory"]["VmRSS_added"] / MIB, 1) for r in runs[a]] for a in runs}
    out(f"separate / derived: {param_ratio:.2f}x parameter bytes held, {added_ratio:.2f}x added after "
        f"txt2img; {rss_ratio:.2f}x VmRSS added after txt2img (per run: derived "
        f"{rss_spread['derived']}, separate {rss_spread['separate']})")
    loads = runs["derived"][0]["companion_loads"]
    out(f"derived: {loads} companion loads (ControlNet, inpainting UNet); the base's UNet, VAE and "
        "text encoder are shared by all five pipelines")

    out()
    out("summary")
    later = {a: sum(med(a, m, "total") for m in MODES[1:]) * 1000 for a in runs}
    out(f"  time to first image in the four modes after txt2img: {later['derived']:.0f} ms derived vs "
        f"{later['separate']:.0f} ms separate ({later['separate'] / later['derived']:.1f}x); getting the "
        f"pipelines alone {after_first[1] / after_first[0]:.0f}x")
    out(f"  weights held for all five pipelines: {mem('derived', 'distinct'):.1f} MiB derived vs "
        f"{mem('separate', 'distinct'):.1f} MiB separate ({param_ratio:.1f}x; {added_ratio:.1f}x for "
        f"what the four modes add); VmRSS added {mem('derived', 'VmRSS_added'):.0f} vs "
        f"{mem('separate', 'VmRSS_added'):.0f} MiB, Pss added {mem('derived', 'Pss_added'):.0f} vs "
        f"{mem('separate', 'Pss_added'):.0f} MiB (CPU weights are mmapped files: RAM holds each file once)")
    identical = all(run["modes"][m]["image"] == runs["derived"][0]["modes"][m]["image"]
                    for m in MODES for run in runs["derived"] + runs["separate"])
    out(f"  same pixels from both approaches in every mode and run: {'yes' if identical else 'NO'}")


if __name__ == "__main__":
    main()
