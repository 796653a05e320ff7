"""Scenes end to end on tiny-sd15: ``POST /v1/scenes`` to a finished job, with and without the
face stage, against the old application's way (a fresh process per request that loads the
pipelines and runs both stages), measured in the same run.

Starts everything itself: moto's S3 server, a private redis-server and a stack (gateway and
generator worker) on a SQLite file, with the model cache in a temporary folder unless
``--model-cache`` names one. Through HTTP it makes a tenant's place with a 128x96 gradient
background, an action posed by keypoints (medium shot; masks derived from them) and a LoRA for
tiny-sd15, then times ``--runs`` scenes per series after one warm-up each: the body stage
alone, then body + face with the LoRA. It prints the p50 wall (submit to a terminal status
read through ``GET /v1/jobs/{id}``) and each stage's share of it from the jobs'
``result.timings``, with the diffusers call alone from their manifests' ``stages``.

The old way gets the very pose map, masks and prompts the service used (read back from a
scene's artifacts and result), so both do the same work at the same size, steps and seed:
``StableDiffusionControlNetInpaintPipeline`` (the inpainting UNet with the openpose ControlNet)
on the body mask, then ``StableDiffusionInpaintPipeline`` with the LoRA loaded on the face
mask, each loaded from the folders the worker uses, in ``python bench/scenes.py
--old-way-once REQUEST.json``. Its p50 and the ratio old/new are printed, and whether its
pixels equal the service's.

Last, it checks that the worker loads the model once, not once per stage: its log must show a
single ``loaded model`` line (the start-up preload) and a single ``loaded LoRA`` line over
every scene, and the warm scenes' stage times are set beside the first (cold) ones.

    python bench/scenes.py [--runs 5] [--old-runs N] [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "tiny-sd15"
BACKGROUND_SIZE = (128, 96)
STEPS = 4
SUBJECT = {"gender": "woman", "details": "a red coat"}
TERMINAL = ("succeeded", "failed", "canceled")
# Past this, one old-way request is slow enough that fewer runs give the p50 (2 at least).
SLOW_OLD_WAY_S = 60.0


def p50(values: list[float]) -> float:
    return statistics.median(values)


def gradient_png(width: int, height: int) -> bytes:
    """A background with structure in both directions, so inpainting has something to change."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata([(255 * x // (width - 1), 255 * y // (height - 1), 128)
                   for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- the old way


def old_way_once(request_file: Path) -> int:
    """One request as the old application served it: a process that imports the ML stack,
    loads each stage's pipeline from disk, runs it and exits; its phases go to stdout as JSON.
    The parent times the whole process, interpreter start included."""
    started = time.perf_counter()
    import diffusers
    import torch
    from PIL import Image

    # diffusers imports lazily: touching the classes is the rest of the import
    controlnet_cls: Any = diffusers.ControlNetModel
    body_cls: Any = diffusers.StableDiffusionControlNetInpaintPipeline
    face_cls: Any = diffusers.StableDiffusionInpaintPipeline
    imported = time.perf_counter()
    req = json.loads(request_file.read_text())
    size = (req["width"], req["height"])
    background = Image.open(req["background"]).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    pose = Image.open(req["pose"]).convert("RGB")
    body_mask = Image.open(req["body_mask"]).convert("L")
    face_mask = Image.open(req["face_mask"]).convert("L")
    no_checker = {"safety_checker": None, "feature_extractor": None,
                  "requires_safety_checker": False}

    def generator() -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(req["seed"])]

    controlnet = controlnet_cls.from_pretrained(req["controlnet_dir"], torch_dtype=torch.float32)
    body_pipe = body_cls.from_pretrained(req["inpaint_dir"], controlnet=controlnet,
                                         torch_dtype=torch.float32, **no_checker)
    body_pipe.to(req["device"])
    body_pipe.set_progress_bar_config(disable=True)
    body_loaded = time.perf_counter()
    with torch.inference_mode():
        out = body_pipe(prompt=req["prompt"], negative_prompt=req["negative_prompt"],
                        image=background, mask_image=body_mask, control_image=pose,
                        width=size[0], height=size[1], num_inference_steps=req["steps"],
                        guidance_scale=req["guidance_scale"], strength=req["body_strength"],
                        controlnet_conditioning_scale=req["control_scale"],
                        generator=generator()).images[0]
    image = Image.composite(out.convert("RGB"), background, body_mask)
    body_done = time.perf_counter()
    image.save(req["stage1_out"])
    phases = {"import_s": imported - started, "load_body_s": body_loaded - imported,
              "body_s": body_done - body_loaded}
    if req.get("lora"):
        face_pipe = face_cls.from_pretrained(req["base_dir"], torch_dtype=torch.float32,
                                             **no_checker)
        face_pipe.to(req["device"])
        face_pipe.set_progress_bar_config(disable=True)
        face_pipe.load_lora_weights(req["lora"])
        face_loaded = time.perf_counter()
        with torch.inference_mode():
            out = face_pipe(prompt=req["face_prompt"], negative_prompt=req["negative_prompt"],
                            image=image, mask_image=face_mask, width=size[0], height=size[1],
                            num_inference_steps=req["steps"],
                            guidance_scale=req["guidance_scale"], strength=req["face_strength"],
                            generator=generator()).images[0]
        image = Image.composite(out.convert("RGB"), image, face_mask)
        face_done = time.perf_counter()
        phases.update(load_face_s=face_loaded - body_done, face_s=face_done - face_loaded)
    image.save(req["out"])
    phases["inside_s"] = time.perf_counter() - started
    print(json.dumps(phases))
    return 0


def run_old_way(request: dict[str, Any], workdir: Path, seed: int) -> tuple[float, dict[str, float]]:
    """Wall seconds of one old-way process and the phases it reported."""
    request_file = workdir / f"old-way-{seed}.json"
    request_file.write_text(json.dumps({**request, "seed": seed,
                                        "stage1_out": str(workdir / f"old-way-{seed}-stage1.png"),
                                        "out": str(workdir / f"old-way-{seed}.png")}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--old-way-once",
                           str(request_file)], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"old way failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the service


def check(response: Any, expected: int) -> dict[str, Any]:
    if response.status_code != expected:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                           f"{response.status_code} {response.text[:2000]}")
    body: dict[str, Any] = response.json()
    return body


def make_catalog(client: Any, *, model_cache: Path, background: bytes) -> dict[str, str]:
    """A place with one background image, an action posed by keypoints and a LoRA, as a
    tenant makes them: through the API."""
    from shared.specs import EXAMPLE_POSE
    from tests.lora_files import make_lora

    # Short descriptions: the tiny models' tokenizer has a token per character, and a prompt
    # over 77 tokens is encoded in chunks by the service but truncated by plain diffusers, so
    # the old way would no longer render the same pixels.
    place = check(client.post("/v1/places", json={
        "name": "bench-park", "description": "a park"}), 201)
    image = check(client.post(
        f"/v1/places/{place['id']}/images",
        data={"name": "gradient", "description": "a lawn"},
        files={"image": ("gradient.png", background, "image/png")}), 201)
    action = check(client.post("/v1/actions", json={
        "name": "standing", "description": "standing",
        "shots": {"medium": {"pose": {"keypoints": {"people": [
            {"pose_keypoints_2d": EXAMPLE_POSE}]}, "canvas": [512, 512]}}}}), 201)
    lora_bytes = make_lora("sd15", cache_dir=model_cache, seed=1)
    lora = check(client.post("/v1/loras", data={"base_model": MODEL, "name": "bench-face"},
                             files={"file": ("bench-face.safetensors", lora_bytes,
                                             "application/octet-stream")}), 201)
    return {"place": place["id"], "image": image["id"], "action": action["id"],
            "lora": lora["id"], "lora_sha256": lora["sha256"]}


def scene_body(catalog: dict[str, str], seed: int, *, face: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "place": catalog["place"], "image": catalog["image"], "action": catalog["action"],
        "shot": "medium", "subject": SUBJECT, "model": MODEL, "steps": STEPS, "seed": seed}
    if face:
        body["lora"] = {"id": catalog["lora"]}
    return body


def run_scene(client: Any, body: dict[str, Any], timeout: float = 300.0) -> tuple[float, dict[str, Any]]:
    """Seconds from submitting to reading a terminal status, and the job as then read."""
    started = time.perf_counter()
    job = check(client.post("/v1/scenes", json=body), 202)
    deadline = started + timeout
    while job["status"] not in TERMINAL:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"scene {job['id']} still {job['status']} after {timeout:.0f}s")
        time.sleep(0.01)
        job = check(client.get(f"/v1/jobs/{job['id']}"), 200)
    wall = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise RuntimeError(f"scene {job['id']} {job['status']}: {json.dumps(job.get('error'))}")
    return wall, job


def artifact_of(job: dict[str, Any], kind: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [a for a in job["artifacts"] if a["kind"] == kind]
    if not found:
        raise RuntimeError(f"scene {job['id']} has no {kind} artifact; kinds: "
                           f"{sorted({a['kind'] for a in job['artifacts']})}")
    return found[0]


def download(client: Any, artifact: dict[str, Any], path: Path) -> Path:
    response = client.get(artifact["url"])
    response.raise_for_status()
    path.write_bytes(response.content)
    return path


def pipeline_seconds(client: Any, job: dict[str, Any]) -> dict[str, float]:
    """Per stage, the diffusers call alone (the manifest's ``stages[].seconds``): the rest of
    a stage's time is reading its inputs, preparing them and the per-step events."""
    manifest = client.get(artifact_of(job, "manifest")["url"])
    manifest.raise_for_status()
    seconds: dict[str, float] = {}
    for stage in manifest.json()["stages"]:
        key = f"{stage['stage']}_s"
        seconds[key] = seconds.get(key, 0.0) + stage["seconds"]
    return seconds


def print_series(label: str, walls: list[float], jobs: list[dict[str, Any]],
                 calls: list[dict[str, float]]) -> None:
    """The p50 wall and each stage's p50 as a share of it; what the worker's timings do not
    cover (gateway, queue hand-over, events, polling) is the rest."""
    wall = p50(walls)
    print(f"\n{label}: p50 {wall * 1000:7.1f} ms  (min {min(walls) * 1000:.1f}, "
          f"max {max(walls) * 1000:.1f}, n {len(walls)})")
    timings = [dict(job["result"]["timings"]) for job in jobs]
    for t, job_wall in zip(timings, walls, strict=True):
        stages = sum(v for k, v in t.items() if k not in ("total_s", "queue_wait_s"))
        t["other in total_s (stage-1 uploads, manifest)"] = t["total_s"] - stages
        t["outside the worker (gateway, events, polling)"] = (
            job_wall - t["total_s"] - t.get("queue_wait_s", 0.0))
    for key in timings[0]:
        value = p50([t.get(key, 0.0) for t in timings])
        print(f"    {key:46} {value * 1000:8.1f} ms  {100 * value / wall:5.1f} %")
        if key in calls[0]:
            call = p50([c[key] for c in calls])
            print(f"      {'of which the diffusers call':44} {call * 1000:8.1f} ms  "
                  f"{100 * call / wall:5.1f} %")


def worker_loads(log: Path) -> tuple[list[str], list[str]]:
    text = log.read_text(errors="replace")
    return (re.findall(r"loaded model (\S+) in [\d.]+s", text),
            re.findall(r"loaded LoRA (\S+) as adapter", text))


def bench(args: argparse.Namespace, workdir: Path) -> int:

    import httpx
    import numpy as np
    from PIL import Image

    from bench.benchstack import bench_stack
    from services.models.device import pick_device
    from services.models.tiny.diffusion import ensure_tiny_model

    model_cache = (args.model_cache or workdir / "models").resolve()
    background = gradient_png(*BACKGROUND_SIZE)
    seeds = iter(range(1000, 2000))
    # INFO: the worker's "loaded model" lines are the load check
    with bench_stack(workdir, model_cache=model_cache, log_level="INFO",
                     worker=True) as running:
        stack, key = running.stack, running.key
        worker_log = next(c.log for c in stack.children if c.name == "generator")
        with httpx.Client(base_url=stack.url, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            catalog = make_catalog(client, model_cache=model_cache, background=background)
            print(f"{MODEL} scenes: {BACKGROUND_SIZE[0]}x{BACKGROUND_SIZE[1]} background, "
                  f"{STEPS} steps, medium shot; p50 of {args.runs} after one warm-up per series; "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)

            cold: dict[str, dict[str, Any]] = {}
            series: dict[str, tuple[list[float], list[dict[str, Any]]]] = {}
            for name, face in (("body", False), ("body + face", True)):
                _, cold[name] = run_scene(client, scene_body(catalog, next(seeds), face=face))
                walls, jobs = [], []
                for _ in range(args.runs):
                    wall, job = run_scene(client, scene_body(catalog, next(seeds), face=face))
                    walls.append(wall)
                    jobs.append(job)
                series[name] = (walls, jobs)
                print_series(f"scene, {name}" + (" (LoRA)" if face else ""), walls, jobs,
                             [pipeline_seconds(client, job) for job in jobs])
            size = (series["body + face"][1][0]["spec"]["width"],
                    series["body + face"][1][0]["spec"]["height"])

            # The old way is given what the service used: its pose map, masks and prompts.
            reference = series["body + face"][1][0]
            inputs = workdir / "old-way"
            inputs.mkdir()
            (inputs / "background.png").write_bytes(background)
            lora_file = inputs / "face.safetensors"
            from tests.lora_files import make_lora

            lora_file.write_bytes(make_lora("sd15", cache_dir=model_cache, seed=1))
            spec = reference["spec"]
            request = {
                "base_dir": str(ensure_tiny_model(MODEL, model_cache)),
                "inpaint_dir": str(ensure_tiny_model(f"{MODEL}-inpaint", model_cache)),
                "controlnet_dir": str(ensure_tiny_model(f"{MODEL}-controlnet-openpose",
                                                        model_cache)),
                "lora": str(lora_file),
                # the worker's device ("auto"); tiny-sd15's preset runs float32 on every device
                "device": pick_device("auto"),
                "background": str(inputs / "background.png"),
                **{name: str(download(client, artifact_of(reference, kind), inputs / f"{name}.png"))
                   for name, kind in (("pose", "pose_control"), ("body_mask", "body_mask"),
                                      ("face_mask", "face_mask"))},
                "prompt": reference["result"]["prompt"],
                "face_prompt": reference["result"]["face_prompt"],
                "negative_prompt": spec.get("negative_prompt"),
                "width": spec["width"], "height": spec["height"], "steps": spec["steps"],
                "guidance_scale": spec["guidance_scale"],
                "body_strength": spec["strength"]["body"], "face_strength": spec["strength"]["face"],
                "control_scale": spec["control_scale"],
            }
            service_png = download(client, artifact_of(reference, "image"), inputs / "service.png")
            service_stage1 = download(client, artifact_of(reference, "stage_image"),
                                      inputs / "service-stage1.png")

    # Measured with the stack stopped, so the worker's idle polling takes no CPU from it.
    print(f"\nold way: a fresh process per request loading both pipelines "
          f"({size[0]}x{size[1]}, {STEPS} steps, {request['device']})", flush=True)
    first_wall, _ = run_old_way(request, inputs, spec["seed"])  # warm-up: the page cache

    def same_pixels(service: Path, old_way: Path) -> str:
        a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (service, old_way))
        return "equal" if np.array_equal(a, b) else f"differ (max |diff| {np.abs(a - b).max()})"

    same = {stage: same_pixels(theirs, inputs / f"old-way-{spec['seed']}{suffix}.png")
            for stage, theirs, suffix in (("stage 1", service_stage1, "-stage1"),
                                          ("final", service_png, ""))}
    old_runs = args.old_runs or args.runs
    if first_wall > SLOW_OLD_WAY_S:
        old_runs = max(2, min(old_runs, 3))
    old_walls, old_phases = [], []
    for _ in range(old_runs):
        wall, phases = run_old_way(request, inputs, next(seeds))
        old_walls.append(wall)
        old_phases.append(phases)
    old = p50(old_walls)
    print(f"  p50 {old * 1000:7.1f} ms  (min {min(old_walls) * 1000:.1f}, "
          f"max {max(old_walls) * 1000:.1f}, n {len(old_walls)})")
    for phase in old_phases[0]:
        if phase != "inside_s":
            value = p50([p[phase] for p in old_phases])
            print(f"    {phase:14} {value * 1000:8.1f} ms  {100 * value / old:5.1f} %")
    start_s = old - p50([p["inside_s"] for p in old_phases])
    print(f"    {'interpreter start':14} {start_s * 1000:8.1f} ms  {100 * start_s / old:5.1f} %")
    print(f"  against the service's images for seed {spec['seed']}: "
          + ", ".join(f"{stage} {verdict}" for stage, verdict in same.items()))

    new = p50(series["body + face"][0])
    print(f"\nold / new, body + face: {old / new:6.1f} x  ({old * 1000:.1f} ms / "
          f"{new * 1000:.1f} ms); load average now {os.getloadavg()[0]:.2f}")

    # One model, loaded once: the stages derive their pipelines from it.
    models, loras = worker_loads(worker_log)
    print(f"\nworker log: `loaded model` {len(models)} time(s) {models}, `loaded LoRA` "
          f"{len(loras)} time(s) over {2 * (args.runs + 1)} scenes")
    for name in ("body", "body + face"):
        warm = series[name][1]
        for stage in ("body_s", "face_s"):
            if stage in cold[name]["result"]["timings"]:
                print(f"  {name:12} {stage}: first scene "
                      f"{cold[name]['result']['timings'][stage] * 1000:7.1f} ms, later p50 "
                      f"{p50([j['result']['timings'][stage] for j in warm]) * 1000:7.1f} ms")
    once = models == [MODEL] and len(loras) == 1
    print("model loaded once for both stages: " + ("yes" if once else "NO"))
    return 0 if once else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed scenes per series")
    parser.add_argument("--old-runs", type=int, default=0,
                        help="timed old-way processes (default: --runs, fewer if slow)")
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="where tiny models are built/found (default: a temp dir)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the logs, inputs and images in a temp dir")
    parser.add_argument("--old-way-once", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.old_way_once is not None:
        return old_way_once(args.old_way_once)
    if args.keep:
        workdir = Path(tempfile.mkdtemp(prefix="loomis-bench-scenes-"))
        print(f"keeping logs and images in {workdir}")
        return bench(args, workdir)
    with tempfile.TemporaryDirectory(prefix="loomis-bench-scenes-") as tmp:
        return bench(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
