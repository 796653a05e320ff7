"""Captioning and tagging throughput: batched calls vs. one image per call, in the same run.

Loads a BLIP captioner and a WD14 tagger once each (the built-in tiny models unless real
model folders are given), then captions and tags N synthetic images at the given size, once
with ``batch_size`` images per model call and once one image per call, and reports
images/s, the batching speed-up, each model's load time and the process's resident memory
growth from loading it (VmRSS in /proc/self/status). Timings are the best of ``--repeats``
passes, after one warm-up call, so other work on the machine distorts them less.

    HF_HUB_OFFLINE=1 python bench/tagger.py [--images 64] [--size 256] [--batch-size 8]
        [--captioner DIR] [--tagger DIR] [--max-length 40] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.models.tiny.tagging import ensure_tagger_model  # noqa: E402
from services.tagger.models import Captioner, Tagger  # noqa: E402


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def synthetic_images(count: int, size: int) -> list[Image.Image]:
    """Flat backgrounds with a few coloured shapes; every third one is not square."""
    images = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        width, height = (size, size * 3 // 4) if seed % 3 == 0 else (size, size)
        image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(5):
            x, y = (int(v) for v in rng.integers(0, min(width, height) * 3 // 4, 2))
            w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
            draw.ellipse((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        images.append(image)
    return images


def best_time(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def load(factory: Callable[[], object]) -> tuple[object, float, float]:
    before = rss_mib()
    started = time.perf_counter()
    model = factory()
    return model, time.perf_counter() - started, rss_mib() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic images, pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--captioner", type=Path, help="BLIP model folder (default: built-in tiny-blip)")
    parser.add_argument("--tagger", type=Path, help="WD14 folder with model.onnx + selected_tags.csv "
                        "(default: built-in tiny-wd14)")
    parser.add_argument("--max-length", type=int, default=40, help="caption length limit, tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per configuration; best is kept")
    parser.add_argument("--threads", type=int, help="torch and onnxruntime intra-op threads "
                        "(default: theirs, one per core)")
    args = parser.parse_args()

    # Libraries are imported before measuring, so load figures are the models' own cost.
    import onnxruntime  # noqa: F401
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="loomis-bench-tagger-"))
    captioner_dir = args.captioner or ensure_tagger_model("tiny-blip", cache)
    tagger_dir = args.tagger or ensure_tagger_model("tiny-wd14", cache)
    images = synthetic_images(args.images, args.size)

    print(f"{args.images} synthetic images at {args.size}px; batch {args.batch_size} vs 1 image per call; "
          f"{torch.get_num_threads()} torch threads; best of {args.repeats}")
    print(f"captioner {captioner_dir}\ntagger    {tagger_dir}")

    tagger, tagger_load_s, tagger_rss = load(lambda: Tagger(tagger_dir, intra_op_num_threads=args.threads))
    captioner, captioner_load_s, captioner_rss = load(lambda: Captioner(captioner_dir))
    assert isinstance(tagger, Tagger) and isinstance(captioner, Captioner)

    rows = []
    caption_options = {"max_length": args.max_length}
    captioner.caption(images[:1], **caption_options)  # warm-up
    batched_captions: list[str] = []

    def caption_batched() -> None:
        batched_captions[:] = captioner.caption(images, batch_size=args.batch_size, **caption_options)

    single_captions: list[str] = []

    def caption_single() -> None:
        single_captions[:] = [captioner.caption([image], **caption_options)[0] for image in images]

    rows.append(("captioning", best_time(caption_batched, args.repeats),
                 best_time(caption_single, args.repeats), captioner_load_s, captioner_rss))

    tagger.tag(images[:1])  # warm-up
    rows.append(("tagging",
                 best_time(lambda: tagger.tag(images, batch_size=args.batch_size), args.repeats),
                 best_time(lambda: [tagger.tag([image]) for image in images], args.repeats),
                 tagger_load_s, tagger_rss))

    print()
    print(f"{'model':12} {'batched img/s':>14} {'1-per-call img/s':>17} {'speed-up':>9} "
          f"{'load s':>8} {'RSS +MiB':>9}")
    for name, batched, single, load_s, rss in rows:
        print(f"{name:12} {args.images / batched:14.1f} {args.images / single:17.1f} "
              f"{single / batched:8.2f}x {load_s:8.2f} {rss:9.1f}")
    same = batched_captions == single_captions
    print(f"\nbatched and one-per-call captions identical: {same}; "
          f"process RSS now {rss_mib():.0f} MiB")
    print("(load s = one-time model load per process; RSS +MiB = resident memory growth from loading "
          "the model, libraries already imported)")


if __name__ == "__main__":
    main()
