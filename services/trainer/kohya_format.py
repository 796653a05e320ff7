"""kohya sd-scripts' LoRA file: module names, ``lora_down``/``lora_up``/``alpha`` tensors and the
``ss_*``/``modelspec.*`` metadata that A1111, ComfyUI and kohya's own tools read.

The metadata says what the run did (datasets, buckets, options, steps), so every option the
trainer honours shows here; one that is parsed but missing from it is one nobody can check.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch

from services.trainer.data import Item, TrainExample
from services.trainer.optim import optimizer_label
from shared.modelfiles import read_safetensors_header

if TYPE_CHECKING:
    from services.trainer.train import TrainConfig

ADAPTER = "default"  # the peft adapter name the trainer injects
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The weights lora_state_dict writes; the prefix names the pipeline component they adapt.
_WEIGHT = re.compile(r"^(?P<module>lora_(?P<prefix>unet|te)_[^.]+)\.(?P<role>lora_down|lora_up)\.weight$")
_COMPONENTS = {"unet": "unet", "te": "text_encoder"}
# The UNet's cross-attention key/value projections take the text encoder's width.
_CROSS_ATTENTION_KV = ("_attn2_to_k", "_attn2_to_v")


def kohya_module(prefix: str, module: str) -> str:
    if prefix == "lora_te" and not module.startswith("text_model."):
        # sd-scripts names CLIP layers from transformers 4's nesting (text_model.encoder…).
        module = f"text_model.{module}"
    return f"{prefix}_{module.replace('.', '_')}"


def lora_state_dict(trainable: Mapping[str, torch.nn.Parameter], *, alpha: float,
                    save_precision: str) -> dict[str, torch.Tensor]:
    """The adapters (``unet.``/``te.``-prefixed peft names) in kohya naming and ``save_precision``."""
    dtypes = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes[save_precision]
    out: dict[str, torch.Tensor] = {}
    for name, param in trainable.items():
        prefix, _, path = name.partition(".")
        if f".lora_A.{ADAPTER}." not in path:
            continue
        module = path.split(f".lora_A.{ADAPTER}.")[0]
        up = trainable[f"{prefix}.{module}.lora_B.{ADAPTER}.weight"]
        key = kohya_module("lora_unet" if prefix == "unet" else "lora_te", module)
        out[f"{key}.lora_down.weight"] = param.detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def training_metadata(cfg: TrainConfig, examples: Sequence[TrainExample], items: Sequence[Item], *,
                      step: int, epoch: int, finished: bool, session_id: str, started_at: float,
                      batches_per_epoch: int, num_epochs: int, total_steps: int, relative_step: bool,
                      seed: int, model_name: str) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` metadata of a LoRA saved at ``step``, as strings."""
    tags: dict[str, Counter[str]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for example in examples:
        subset = example.subset()
        entry = dirs.setdefault(subset, {"n_repeats": example.repeats, "img_count": 0})
        entry["img_count"] += 1
        counter = tags.setdefault(subset, Counter())
        counter.update(tag.strip() for tag in example.caption.split(",") if tag.strip())
    buckets = Counter(item.bucket for item in items)
    bucket_info = {"buckets": {str(i): {"resolution": list(size), "count": count}
                               for i, (size, count) in enumerate(sorted(buckets.items()))},
                   "mean_img_ar_error": 0.0}
    # a dataset config's own batch size and resolution, where all its datasets agree (kohya
    # lists each in ss_datasets)
    batch_sizes = {example.batch_size or cfg.batch_size for example in examples}
    batch_size = batch_sizes.pop() if len(batch_sizes) == 1 else cfg.batch_size
    resolutions = {example.resolution or (cfg.resolution, cfg.resolution) for example in examples}
    resolution = resolutions.pop() if len(resolutions) == 1 else (cfg.resolution, cfg.resolution)
    datasets_meta: list[dict[str, object]] = []
    for number in sorted({example.dataset for example in examples}):
        members = [example for example in examples if example.dataset == number]
        in_dataset = [item for item in items if item.dataset == number]
        first = members[0]
        datasets_meta.append({
            "is_dreambooth": True, "batch_size_per_device": first.batch_size or cfg.batch_size,
            "num_train_images": sum(1 for item in in_dataset if not item.is_reg),
            "num_reg_images": sum(1 for item in in_dataset if item.is_reg),
            "resolution": list(first.resolution or (cfg.resolution, cfg.resolution)),
            "bucket_info": {"buckets": {str(i): {"resolution": list(size), "count": count}
                                        for i, (size, count) in enumerate(sorted(
                                            Counter(item.bucket for item in in_dataset).items()))}},
            "subsets": [{"image_dir": name, "num_repeats": example.repeats, "is_reg": example.is_reg,
                         **({"shuffle_caption": example.options.shuffle_caption,
                             "keep_tokens": example.options.keep_tokens,
                             "caption_dropout_rate": example.options.caption_dropout_rate,
                             "flip_aug": example.options.flip_aug,
                             "color_aug": example.options.color_aug,
                             "random_crop": example.options.random_crop} if example.options else {})}
                        for name, example in {e.subset(): e for e in members}.items()],
        })
    unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    now = time.time()
    optimizer = optimizer_label(cfg)
    network_args: dict[str, str] = {}
    if tuple(cfg.target_modules) != UNET_TARGETS:
        network_args["target_modules"] = ",".join(cfg.target_modules)
    values: dict[str, object] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": now if finished else None,
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": te_lr if cfg.train_text_encoder else None,
        "ss_network_train_unet_only": not cfg.train_text_encoder,
        "ss_network_module": "networks.lora",
        "ss_network_dim": cfg.rank,
        "ss_network_alpha": cfg.alpha,
        "ss_network_dropout": cfg.dropout or None,
        "ss_network_args": json.dumps(network_args) if network_args else None,
        "ss_num_train_images": sum(1 for item in items if not item.is_reg),
        "ss_num_reg_images": sum(1 for item in items if item.is_reg),
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_epoch": epoch,
        "ss_steps": step,
        "ss_batch_size_per_device": batch_size,
        "ss_total_batch_size": batch_size * cfg.gradient_accumulation_steps,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_max_train_steps": total_steps,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_lr_scheduler": "adafactor" if relative_step else cfg.lr_scheduler,
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": False,
        "ss_base_model_version": "sd_v1",
        "ss_v_parameterization": cfg.v_parameterization or None,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_enable_bucket": len(buckets) > 1 or any(example.bucket for example in examples),
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_clip_skip": cfg.clip_skip,
        "ss_seed": seed,
        "ss_noise_offset": cfg.noise_offset,
        "ss_adaptive_noise_scale": cfg.adaptive_noise_scale,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations,
        "ss_multires_noise_discount": (cfg.multires_noise_discount if cfg.multires_noise_iterations
                                       else None),
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_cache_latents": cfg.cache_latents,
        "ss_flip_aug": cfg.flip_aug,
        "ss_color_aug": cfg.color_aug,
        "ss_random_crop": cfg.random_crop,
        "ss_max_token_length": cfg.max_token_length if cfg.max_token_length != 75 else None,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_sd_model_name": cfg.base_model_name or model_name,
        "ss_sd_model_hash": cfg.base_model_hash,
        "ss_new_sd_model_hash": cfg.base_model_hash,
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_datasets": (json.dumps(datasets_meta)
                        if any(example.options or example.batch_size for example in examples) else None),
        "ss_tag_frequency": json.dumps({name: dict(counter) for name, counter in tags.items()}),
        "ss_training_comment": cfg.training_comment or None,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": cfg.output_name,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return {key: str(value) for key, value in values.items() if value is not None}


def lora_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes, with kohya's ``sshs_model_hash`` added to ``metadata``."""
    from safetensors.torch import save

    # kohya's sshs_model_hash covers the tensor data only, so metadata edits keep it.
    bare: bytes = save(tensors)
    header_len = int.from_bytes(bare[:8], "little")
    metadata["sshs_model_hash"] = hashlib.sha256(bare[8 + header_len:]).hexdigest()
    data: bytes = save(tensors, metadata=metadata)
    return data


def lora_record(data: bytes) -> dict[str, Any]:
    """What the gateway keeps of a trained LoRA (its row's ``info``), from the file's own names
    and shapes: the same record an upload of these bytes gets, so a trained LoRA used on a
    model it does not fit is refused exactly as an uploaded one (a test holds the two equal)."""
    tensors, metadata = read_safetensors_header(data)
    modules: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    for name, entry in tensors.items():
        if (match := _WEIGHT.match(name)) is not None:
            key = (_COMPONENTS[match["prefix"]], match["module"])
            modules.setdefault(key, {})[match["role"]] = entry.shape
    widths: dict[str, set[int]] = {}
    dims: set[int] = set()
    for (component, module), shapes in modules.items():
        fan_in, fan_out = shapes["lora_down"][1], shapes["lora_up"][0]
        widths.setdefault(component, set()).update((fan_in, fan_out))
        if component == "unet" and module.endswith(_CROSS_ATTENTION_KV):
            dims.add(fan_in)
    return {"targets": len(modules), "has_text_encoder": "text_encoder" in widths,
            "dims": sorted(dims),
            "widths": {component: sorted(found) for component, found in sorted(widths.items())},
            # safetensors writes metadata in no fixed order: the first 20 of the file, as uploads'
            "metadata": dict(list(metadata.items())[:20])}
