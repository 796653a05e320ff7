"""Subjects end to end on tiny-sd15: photos to a ready LoRA in one call, against the same chain
done by hand through the API in the same run; and the step time of the ``standard`` recipe.

Starts everything itself: moto's S3 server, a private redis-server and a stack (gateway,
generator, tagger and trainer workers) on a SQLite file, with the model cache in a temporary
folder unless ``--model-cache`` names one.

1. ``POST /v1/subjects`` with 5 photos, ``preset=quick`` and ``caption=true``, followed on
   ``GET /v1/subjects/{id}/events`` (SSE) until the stream ends (after ``photos_deleted``).
   Each stage's time comes from the stage events' ``at``: upload and preparing (the POST's
   start to ``captioning``), captioning, training, and the photos' deletion (``ready`` to
   ``photos_deleted``); the tagging and training jobs' ``created_at``/``started_at``/
   ``finished_at`` split each job stage into submit lag, queue wait, run and the event's
   application. The baseline is the way this was done before subjects, measured in the same
   run on the same photos and options: four calls by hand, ``POST /v1/datasets`` (the photos
   in the subject's kohya folder), ``POST /v1/taggings`` then polling ``GET /v1/jobs/{id}``
   every 50 ms, ``POST /v1/trainings`` (the subject's resolved ``training`` options) then
   polling, and ``DELETE /v1/datasets/{id}``. One warm-up of each, then ``--runs`` alternating
   pairs; p50s and the ratio one call / by hand are printed, to ``ready`` and to the photos'
   deletion, both as the client learned them.
2. The ``standard`` recipe's step time on this CPU: a subject with ``preset=standard`` and
   ``overrides`` that swap the base model for tiny-sd15 (the real SD1.5 weights cannot be
   downloaded here) and stop after ``--standard-steps`` steps (``max_train_epochs`` null: it
   wins over steps otherwise), at the recipe's 512 px, batch 1, rank 16, on 512 px photos.
   Per-step times come from ``GET /v1/trainings/{id}/metrics`` (the trainer's ``step_time_s``).
   The stated baseline is the old application's: 1,500 steps in 60-90 min on a GTX 1060 with
   real SD1.5, 2.4-3.6 s/step. The ratio compares hardware and model together (a tiny random
   UNet on this CPU against SD1.5's 860M-parameter UNet on that GPU), not like for like, and
   the output says so.

Last, the LoRA of one quick subject is used in a generation (``"subject": id``) and that
subject is deleted (``DELETE /v1/subjects/{id}?outputs=true``), each timed once.

    python bench/subject.py [--runs 5] [--standard-steps 10] [--model-cache DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "tiny-sd15"
PHOTOS = 5
CLASS_WORD = "woman"
TERMINAL = ("succeeded", "failed", "canceled")
POLL_S = 0.05
# The old application: 5 photos x 300 repeats = 1,500 steps of SD1.5 at 512 px, 60-90 min.
OLD_STEPS, OLD_MINUTES = 1500, (60, 90)
SD15_UNET_PARAMS = 859_520_964
STAGES = ("upload / preparing", "captioning", "training", "photo deletion")


def p50(values: list[float]) -> float:
    return statistics.median(values)


def check(response: Any, expected: int) -> dict[str, Any]:
    if response.status_code != expected:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                           f"{response.status_code} {response.text[:2000]}")
    body: dict[str, Any] = response.json() if response.content else {}
    return body


def at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def seconds(a: str | datetime, b: str | datetime) -> float:
    start = at(a) if isinstance(a, str) else a
    end = at(b) if isinstance(b, str) else b
    return (end - start).total_seconds()


def wait_job(client: Any, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
    """Poll ``GET /v1/jobs/{id}`` every ``POLL_S`` until terminal, as a client by hand does."""
    deadline = time.perf_counter() + timeout
    while True:
        job = check(client.get(f"/v1/jobs/{job_id}"), 200)
        if job["status"] in TERMINAL:
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {job['status']}: {json.dumps(job.get('error'))}")
            return job
        if time.perf_counter() > deadline:
            raise RuntimeError(f"job {job_id} still {job['status']} after {timeout:.0f}s")
        time.sleep(POLL_S)


def job_split(job: dict[str, Any], stage_start: str, stage_end: str) -> dict[str, float]:
    """A job stage of a subject: submit lag (the stage's event to the job's row), queue wait,
    the run, and the terminal event's application (the job's end to the next stage's event)."""
    return {"submit": seconds(stage_start, job["created_at"]),
            "queue wait": seconds(job["created_at"], job["started_at"]),
            "run": seconds(job["started_at"], job["finished_at"]),
            "event applied": seconds(job["finished_at"], stage_end)}


def follow(client: Any, subject_id: str, t0: float) -> list[tuple[float, dict[str, Any]]]:
    """Every message of the subject's SSE stream, with when it arrived (s after ``t0``)."""
    import httpx
    from httpx_sse import connect_sse

    arrived: list[tuple[float, dict[str, Any]]] = []
    with connect_sse(client, "GET", f"/v1/subjects/{subject_id}/events",
                     timeout=httpx.Timeout(30, read=600)) as source:
        for sse in source.iter_sse():
            if sse.data:
                arrived.append((time.perf_counter() - t0, json.loads(sse.data)))
    return arrived


# --------------------------------------------------------------------------- one call


def one_call(client: Any, images: list[bytes], **fields: Any) -> dict[str, Any]:
    """``POST /v1/subjects``, followed on its events until the stream ends."""
    from tests.subject_support import create

    started = datetime.now(UTC)
    t0 = time.perf_counter()
    subject = check(create(client, images, **fields), 202)
    posted = time.perf_counter() - t0
    arrived = follow(client, subject["id"], t0)
    final = check(client.get(f"/v1/subjects/{subject['id']}"), 200)
    stages = {e["type"]: (client_s, e) for client_s, e in arrived if e["seq"] is not None}
    kept = fields.get("retain_photos", False)
    wanted = ["ready"] if kept else ["ready", "photos_deleted"]
    if final["status"] != "ready" or any(name not in stages for name in wanted):
        raise RuntimeError(f"subject {subject['id']} ended {final['status']} "
                           f"({json.dumps(final.get('error'))}); events {sorted(stages)}")
    first_job = "captioning" if final["caption"] else "training"
    ev = {name: e["at"] for name, (_, e) in stages.items()}
    shares = {"upload / preparing": seconds(started, ev[first_job]),
              "captioning": seconds(ev["captioning"], ev["training"]) if final["caption"] else 0.0,
              "training": seconds(ev["training"], ev["ready"]),
              "photo deletion": seconds(ev["ready"], ev["photos_deleted"]) if not kept else 0.0}
    splits: dict[str, dict[str, float]] = {}
    if final["caption"]:
        tagging = check(client.get(f"/v1/jobs/{final['tagging_job_id']}"), 200)
        splits["captioning"] = job_split(tagging, ev["captioning"], ev["training"])
    training = check(client.get(f"/v1/jobs/{final['training_job_id']}"), 200)
    splits["training"] = job_split(training, ev["training"], ev["ready"])
    last = "ready" if kept else "photos_deleted"
    return {"subject": final, "post_s": posted, "stages": shares, "splits": splits,
            "server_total": seconds(started, ev[last]), "server_ready": seconds(started, ev["ready"]),
            "ready_seen": stages["ready"][0], "done_seen": stages[last][0],
            "stream_end": arrived[-1][0], "progress_events": sum(
                1 for _, e in arrived if e["type"] == "progress"),
            "types": [e["type"] for _, e in arrived if e["seq"] is not None]}


# --------------------------------------------------------------------------- by hand


def by_hand(client: Any, images: list[bytes], *, token: str,
            training: dict[str, Any]) -> dict[str, Any]:
    """The same chain as four calls of the API, polling each job, as before subjects."""
    folder = f"1_{token} {CLASS_WORD}"
    t0 = time.perf_counter()
    dataset = check(client.post(
        "/v1/datasets", data={"name": f"by hand {token}", "min_side": "64",
                              "caption_extension": ".caption"},
        files=[("files", (f"{folder}/photo-{i:02d}.png", image, "image/png"))
               for i, image in enumerate(images)]), 201)
    t1 = time.perf_counter()
    tagging = check(client.post("/v1/taggings", json={"dataset_id": dataset["id"]}), 202)
    wait_job(client, tagging["id"])
    t2 = time.perf_counter()
    job = check(client.post("/v1/trainings", json={
        **training, "name": f"{token}-{CLASS_WORD}", "dataset_id": dataset["id"]}), 202)
    trained = wait_job(client, job["id"])
    t3 = time.perf_counter()
    check(client.delete(f"/v1/datasets/{dataset['id']}"), 204)
    t4 = time.perf_counter()
    if not (trained.get("result") or {}).get("lora"):
        raise RuntimeError(f"training {job['id']} registered no LoRA")
    return {"stages": {"upload / preparing": t1 - t0, "captioning": t2 - t1,
                       "training": t3 - t2, "photo deletion": t4 - t3},
            "ready_seen": t3 - t0, "done_seen": t4 - t0}


# --------------------------------------------------------------------------- the standard recipe


def unet_parameters(model_dir: Path) -> int:
    """Parameters of the UNet's safetensors files, from their headers (no tensor is read)."""
    total = 0
    for path in sorted((model_dir / "unet").glob("*.safetensors")):
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items()
                     if name != "__metadata__")
    return total


def standard_steps(client: Any, steps: int) -> dict[str, Any]:
    """A ``standard`` subject on tiny-sd15 for ``steps`` steps; its per-step times."""
    from tests.subject_support import photos

    overrides = {"base_model": MODEL,
                 "optim": {"max_train_steps": steps, "max_train_epochs": None}}
    run = one_call(client, photos(PHOTOS, seed=23, side=512), preset="standard",
                   caption=False, overrides=overrides)
    subject = run["subject"]
    resolution = subject["training"]["data"]["resolution"]
    if resolution not in (512, [512, 512]):
        raise RuntimeError(f"the standard recipe trained at {resolution}, not 512 px")
    metrics = check(client.get(f"/v1/trainings/{subject['training_job_id']}/metrics"), 200)
    times = [point["step_time_s"] for point in metrics["steps"]]
    if len(times) != steps:
        raise RuntimeError(f"expected {steps} steps, the metrics hold {len(times)}")
    job = check(client.get(f"/v1/jobs/{subject['training_job_id']}"), 200)
    return {"run": run, "times": times, "job": job, "training": subject["training"]}


# --------------------------------------------------------------------------- the run


def print_stages(label: str, runs: list[dict[str, Any]], total_key: str) -> float:
    total = p50([r[total_key] for r in runs])
    print(f"  {label}: p50 {total:6.2f} s  (min {min(r[total_key] for r in runs):.2f}, "
          f"max {max(r[total_key] for r in runs):.2f}, n {len(runs)})")
    slowest = max(runs, key=lambda r: float(r[total_key]))
    print(f"    each run: {', '.join(f'{r[total_key]:.2f}' for r in runs)} s; the slowest's stages: "
          + ", ".join(f"{stage} {slowest['stages'][stage]:.2f}" for stage in STAGES))
    for stage in STAGES:
        value = p50([r["stages"][stage] for r in runs])
        print(f"    {stage:30} {value:7.2f} s  {100 * value / total:5.1f} %")
        for part in (runs[0].get("splits") or {}).get(stage, {}):
            sub = p50([r["splits"][stage][part] for r in runs])
            print(f"      {part:28} {sub:7.2f} s  {100 * sub / total:5.1f} %")
    return total


def bench(args: argparse.Namespace, workdir: Path) -> int:
    import httpx

    from bench.benchstack import bench_stack
    from services.gateway.subjects.presets import STANDARD_REPEATS
    from services.models.tiny.diffusion import ensure_tiny_model
    from tests.subject_support import photos

    model_cache = (args.model_cache or workdir / "models").resolve()
    images = photos(PHOTOS)
    subjects: list[dict[str, Any]] = []
    hands: list[dict[str, Any]] = []
    started = time.perf_counter()
    with bench_stack(workdir, model_cache=model_cache, worker=True, tagger=True,
                     trainer=True) as running:
        stack, key = running.stack, running.key
        print(f"stack up in {time.perf_counter() - started:.1f} s (gateway, generator, tagger, "
              f"trainer; SQLite, moto S3); {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        with httpx.Client(base_url=stack.url, timeout=120,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            # --------------------------------------------------------------- 1
            warm = one_call(client, images, caption=True)  # warm-up: first loads and imports
            training = warm["subject"]["training"]
            by_hand(client, images, token="zqwarm", training=training)
            print(f"\n1. {PHOTOS} photos ({len(images[0])} B PNGs, 64 px) -> ready LoRA on "
                  f"{MODEL}, preset quick ({training['optim']['max_train_steps']} steps at "
                  f"{training['data']['resolution']} px), caption=true; p50 of {args.runs} "
                  "alternating pairs after one warm-up each", flush=True)
            print(f"  stage events: {' -> '.join(warm['types'])}")
            for index in range(args.runs):
                subjects.append(one_call(client, images, caption=True))
                hands.append(by_hand(client, images, token=f"zqhand{index}", training=training))
            print("\n  one call: POST /v1/subjects + SSE; stage times from the events' `at`, "
                  "shares of POST start -> photos_deleted")
            print_stages("one call, to photos deleted (server clock)", subjects, "server_total")
            post = p50([r["post_s"] for r in subjects])
            print(f"    {'(the POST itself answered in':30} {post:7.2f} s)")
            print("\n  by hand: 4 calls (dataset upload, tagging, training, dataset delete), "
                  f"polling each job every {POLL_S * 1000:.0f} ms")
            print_stages("by hand, to dataset deleted (client clock)", hands, "done_seen")

            ready_one = p50([r["ready_seen"] for r in subjects])
            ready_hand = p50([r["ready_seen"] for r in hands])
            done_one = p50([r["done_seen"] for r in subjects])
            done_hand = p50([r["done_seen"] for r in hands])
            lag = p50([r["done_seen"] - r["server_total"] for r in subjects])
            server_ready = p50([r["server_ready"] for r in subjects])
            print(f"\n  client learned (p50): ready {ready_one:.2f} s one call vs "
                  f"{ready_hand:.2f} s by hand -> {ready_one / ready_hand:.2f} x; photos "
                  f"deleted {done_one:.2f} s vs {done_hand:.2f} s -> {done_one / done_hand:.2f} x")
            print(f"  on the server's clock (the POST's start to the `ready` event's `at`) the one "
                  f"call was ready at {server_ready:.2f} s: {server_ready / ready_hand:.2f} x by "
                  "hand's client-seen time")
            print(f"  (the SSE stream wakes on its gateway's changes, else looks every 0.5 s: the "
                  "one-call client "
                  f"learned of photos_deleted {lag * 1000:.0f} ms after it happened, p50; "
                  f"{p50([r['progress_events'] for r in subjects]):.0f} progress events per "
                  "subject)")
            print("  (by hand deletes the dataset only; the subject's retention also deletes the "
                  "tagging and training outputs and their Redis payloads and events)")
            purged = subjects[-1]["subject"]["purged"]
            print(f"  purged record of the last subject: {purged['photos']} photos, "
                  f"{purged['objects']} storage objects; what: {', '.join(purged['what'])}")

            # --------------------------------------------------------------- 2
            print(f"\n2. the standard recipe's steps on this CPU: preset=standard with overrides "
                  f"base_model={MODEL}, optim.max_train_steps={args.standard_steps}, "
                  f"max_train_epochs=null; {PHOTOS} photos of 512 px", flush=True)
            std = standard_steps(client, args.standard_steps)
            cfg = std["training"]
            times = std["times"]
            steady = times[1:] or times
            step_s = p50(steady)
            print(f"  trained: {cfg['base_model']}, resolution {cfg['data']['resolution']}, batch "
                  f"{cfg['data']['batch_size']}, rank {cfg['network']['rank']}, "
                  f"{cfg['optim']['optimizer']}, {len(times)} steps; job run "
                  f"{seconds(std['job']['started_at'], std['job']['finished_at']):.1f} s "
                  f"(model load and latents included)")
            print(f"  step_time_s per step: {', '.join(f'{t:.3f}' for t in times)}")
            print(f"  p50 of steps 2-{len(times)}: {step_s:.3f} s/step "
                  f"({1 / step_s:.2f} it/s); first step {times[0]:.3f} s")
            full = PHOTOS * STANDARD_REPEATS
            print(f"  the full recipe ({PHOTOS} photos x {STANDARD_REPEATS} repeats = {full:,} "
                  f"steps) at this rate: {full * step_s / 60:.1f} min, on {MODEL}, not SD1.5")
            tiny = unet_parameters(ensure_tiny_model(MODEL, model_cache))
            old_low, old_high = (minutes * 60 / OLD_STEPS for minutes in OLD_MINUTES)
            print(f"  baseline (stated, the old application): GTX 1060, real SD1.5, {OLD_STEPS:,} "
                  f"steps in {OLD_MINUTES[0]}-{OLD_MINUTES[1]} min = {old_low:.1f}-{old_high:.1f} "
                  "s/step")
            print(f"  ratio GTX 1060 / this run: {old_low / step_s:.1f}-{old_high / step_s:.1f} x "
                  f"fewer seconds per step here. NOT like for like: this is {MODEL} ({tiny:,} UNet "
                  f"parameters, random weights) on {os.cpu_count()} CPU cores, against SD1.5 "
                  f"({SD15_UNET_PARAMS:,} UNet parameters, {SD15_UNET_PARAMS / tiny:,.0f} x as "
                  "many) on a GPU; the ratio compares hardware and model together and says "
                  "nothing about how fast SD1.5 trains here (bench/real_models.py times real-size "
                  "SD1.5 steps)")

            # --------------------------------------------------------------- use and forget
            sid = subjects[-1]["subject"]["id"]
            trigger = subjects[-1]["subject"]["trigger_words"][0]
            t0 = time.perf_counter()
            gen = check(client.post("/v1/generations", json={
                "prompt": "a portrait", "model": MODEL, "steps": 2, "seed": 3,
                "subject": sid}), 202)
            gen = wait_job(client, gen["id"])
            gen_s = time.perf_counter() - t0
            uses = gen["spec"]["prompt"].startswith(trigger)
            t0 = time.perf_counter()
            deleted = client.delete(f"/v1/subjects/{sid}", params={"outputs": "true"})
            delete_s = time.perf_counter() - t0
            gone = client.get(f"/v1/subjects/{sid}").status_code == 404 and client.get(
                f"/v1/jobs/{gen['id']}").status_code == 404
            print(f"\nuse and forget: a generation with \"subject\" {gen_s:.2f} s (prompt starts "
                  f"with {trigger!r}: {'yes' if uses else 'NO'}); DELETE /v1/subjects/{{id}}"
                  f"?outputs=true answered {deleted.status_code} in {delete_s * 1000:.0f} ms; "
                  f"subject and its generation gone: {'yes' if gone else 'NO'}")

    ok = uses and gone and deleted.status_code == 204
    print(f"\nsummary: photos -> ready in one call {ready_one:.2f} s vs {ready_hand:.2f} s by hand "
          f"({ready_one / ready_hand:.2f} x), to photos deleted {done_one:.2f} s vs "
          f"{done_hand:.2f} s ({done_one / done_hand:.2f} x); standard recipe on {MODEL} "
          f"{step_s:.3f} s/step here vs 2.4-3.6 s/step for SD1.5 on a GTX 1060 (hardware and "
          "model differ: not like for like); load average now "
          f"{os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5,
                        help="timed one-call / by-hand pairs after one warm-up each")
    parser.add_argument("--standard-steps", type=int, default=10,
                        help="steps of the standard recipe to time")
    parser.add_argument("--model-cache", type=Path, default=None,
                        help="where tiny models are built/found (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the logs in a temp dir")
    args = parser.parse_args()
    if args.keep:
        workdir = Path(tempfile.mkdtemp(prefix="loomis-bench-subject-"))
        print(f"keeping logs in {workdir}")
        return bench(args, workdir)
    with tempfile.TemporaryDirectory(prefix="loomis-bench-subject-") as tmp:
        return bench(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
