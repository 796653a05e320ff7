"""Every object-storage key Loomis writes or reads, built here and nowhere else.

The layout is ``<root>/<tenant>/<owner>/…``: the root says what kind of object it is
(``outputs``, ``inputs``, ``datasets``, ``loras``, ``places``, …), the tenant comes next so
everything a tenant owns is found by a handful of prefixes (:func:`tenant_prefixes`), and the
owner (a job, a dataset, a LoRA) next so deleting the owner is one ``delete_prefix`` of its
prefix. Every key an owner has lies under that owner's prefix; nothing else does.

Objects already stored are found by these strings, so a layout here never changes without a
migration of the objects. Workers receive a job's prefix in their task (``output_prefix``):
the gateway alone decides where a job's objects go, and the functions for keys under such a
prefix take the prefix itself.

Plain strings only: the gateway and every worker import this, so it imports nothing heavy.
"""

from __future__ import annotations

import uuid

# --- per tenant ------------------------------------------------------------------------------


def tenant_prefixes(tenant_id: str) -> tuple[str, ...]:
    """Every prefix a tenant's objects live under; deleting all of them deletes the tenant's
    stored data (staging keys under ``tmp/`` are transient and belong to no one)."""
    return (f"outputs/{tenant_id}/", f"inputs/{tenant_id}/", f"datasets/{tenant_id}/",
            f"loras/{tenant_id}/", f"training/{tenant_id}/", f"places/{tenant_id}/",
            f"actions/{tenant_id}/")


# --- generation and sweep jobs -----------------------------------------------------------------


def job_prefix(tenant_id: str, job_id: str) -> str:
    """A generation or sweep job's outputs; also what a failed attempt cleans up."""
    return f"outputs/{tenant_id}/{job_id}/"


def output_key(tenant_id: str, job_id: str, index: int) -> str:
    """Image ``index`` of a job: deterministic, so a re-run attempt overwrites, never adds."""
    return f"{job_prefix(tenant_id, job_id)}{index}.png"


def manifest_key(tenant_id: str, job_id: str) -> str:
    """Written last, beside the images it lists: its presence means they are all in place."""
    return f"{job_prefix(tenant_id, job_id)}manifest.json"


def contact_sheet_key(tenant_id: str, job_id: str) -> str:
    """A sweep's grid of its cells, beside the cell images it is drawn from."""
    return f"{job_prefix(tenant_id, job_id)}contact_sheet.png"


def sweep_metadata_key(tenant_id: str, job_id: str) -> str:
    """A sweep's axes and cells in full (the sheet's labels are shortened)."""
    return f"{job_prefix(tenant_id, job_id)}sweep.json"


def scene_asset_key(tenant_id: str, job_id: str, name: str) -> str:
    """A scene's intermediate images (its pose control, body and face masks, stage-1 image),
    beside its outputs so the job's cleanup and deletion cover them."""
    return f"{job_prefix(tenant_id, job_id)}{name}.png"


# --- input images ------------------------------------------------------------------------------


def uploads_prefix(tenant_id: str) -> str:
    """The tenant's input images: uploads, inline data and control previews alike."""
    return f"inputs/{tenant_id}/uploads/"


def upload_key(tenant_id: str, upload_id: str) -> str:
    """Input images are content-addressed per tenant (the id is a hash of the PNG): the same
    image is stored once, and a job or a repeated upload that names it finds it again."""
    return f"{uploads_prefix(tenant_id)}{upload_id}.png"


# --- datasets ----------------------------------------------------------------------------------


def dataset_prefix(tenant_id: str, dataset_id: str) -> str:
    """A dataset's images, captions, thumbnails and tagging outputs."""
    return f"datasets/{tenant_id}/{dataset_id}/"


def dataset_item_key(tenant_id: str, dataset_id: str, path: str) -> str:
    """An image at its path inside the dataset (``10_sks dog/a.png``): kohya's folder names
    carry meaning (repeats, class), so the stored tree mirrors the uploaded one."""
    return f"{dataset_prefix(tenant_id, dataset_id)}{path}"


def dataset_thumb_key(tenant_id: str, dataset_id: str, item_id: str) -> str:
    """An item's thumbnail by item id, in a hidden folder: ingest ignores hidden folders, so no
    uploaded image can land on a thumbnail's key."""
    return f"{dataset_prefix(tenant_id, dataset_id)}.thumbs/{item_id}.jpg"


def caption_key(image_key: str, extension: str) -> str:
    """A caption file beside its image, as kohya looks for it: the image's name with the
    caption extension in place of the image's (``a.png`` -> ``a.caption``)."""
    return image_key.rsplit(".", 1)[0] + extension


def tagging_prefix(tenant_id: str, dataset_id: str, job_id: str) -> str:
    """A tagging job's outputs sit inside the dataset they describe, so deleting the dataset
    deletes them; per job, so a retry of one job overwrites only its own."""
    return f"{dataset_prefix(tenant_id, dataset_id)}taggings/{job_id}/"


def tagging_metadata_key(prefix: str) -> str:
    """kohya fine-tuning metadata for the whole dataset, under a tagging job's prefix."""
    return f"{prefix}metadata.json"


def tagging_results_key(prefix: str) -> str:
    """Per-image captions, tags and errors, under a tagging job's prefix."""
    return f"{prefix}results.json"


# --- LoRAs -------------------------------------------------------------------------------------


def lora_prefix(tenant_id: str, lora_id: str) -> str:
    """Everything stored for one LoRA; deleting it (or a failed registration) clears this."""
    return f"loras/{tenant_id}/{lora_id}/"


def lora_key(tenant_id: str, lora_id: str, version: int = 1) -> str:
    """A LoRA's weights by version (uploads and trainings store version 1)."""
    return f"{lora_prefix(tenant_id, lora_id)}{version}.safetensors"


# --- the scenes catalog ------------------------------------------------------------------------


def place_prefix(tenant_id: str, place_id: str) -> str:
    """A place's background images and their thumbnails."""
    return f"places/{tenant_id}/{place_id}/"


def place_image_key(tenant_id: str, place_id: str, image_id: str) -> str:
    """A background as the checked PNG the gateway made of the upload (workers never decode
    client bytes); a key is a prefix of itself alone, so one image is deleted by its keys."""
    return f"{place_prefix(tenant_id, place_id)}{image_id}.png"


def place_thumb_key(tenant_id: str, place_id: str, image_id: str) -> str:
    """A background's small preview, in a hidden folder beside the images."""
    return f"{place_prefix(tenant_id, place_id)}.thumbs/{image_id}.jpg"


def action_prefix(tenant_id: str, action_id: str) -> str:
    """An action's pose images and masks, for every shot."""
    return f"actions/{tenant_id}/{action_id}/"


def action_asset_key(tenant_id: str, action_id: str, asset_id: str) -> str:
    """One pose image or mask, by an id new for every write: a shot replaced by an edit gets
    new keys, so the old ones stay whole until the edit is committed and are deleted after."""
    return f"{action_prefix(tenant_id, action_id)}{asset_id}.png"


# --- training jobs -----------------------------------------------------------------------------


def training_prefix(tenant_id: str, job_id: str) -> str:
    """A training job's samples, checkpoints, resumable state and metrics; the finished LoRA
    goes under :func:`lora_key`, since it outlives the job."""
    return f"training/{tenant_id}/{job_id}/"


def training_samples_prefix(prefix: str) -> str:
    """A training's sample images only, listed while it runs."""
    return f"{prefix}samples/"


def training_sample_key(prefix: str, step: int, index: int) -> str:
    """Sample image ``index`` at ``step``; zero-padded so a listing sorts by step."""
    return f"{training_samples_prefix(prefix)}step-{step:06d}-{index}.png"


def training_checkpoints_prefix(prefix: str) -> str:
    """A training's checkpoints only."""
    return f"{prefix}checkpoints/"


def training_checkpoint_key(prefix: str, step: int) -> str:
    """The LoRA as it was at ``step``."""
    return f"{training_checkpoints_prefix(prefix)}step-{step:06d}.safetensors"


def training_state_prefix(prefix: str) -> str:
    """Resumable states only, so the newest is found by listing this alone."""
    return f"{prefix}state/"


def training_state_key(prefix: str, step: int) -> str:
    """The optimizer, scheduler and RNG state at ``step``, for a resumed run."""
    return f"{training_state_prefix(prefix)}step-{step:06d}.tar"


def training_state_step(key: str) -> int:
    """The step a :func:`training_state_key` was saved at (read back to find the newest)."""
    return int(key.rsplit("step-", 1)[1].split(".")[0])


def training_metrics_key(prefix: str) -> str:
    """Per-step metrics, rewritten at each checkpoint: a resumed run continues the document."""
    return f"{prefix}metrics.json"


def training_curve_key(prefix: str) -> str:
    """The loss curve drawn from the metrics, beside them."""
    return f"{prefix}loss_curve.png"


def training_tmp_prefix(prefix: str) -> str:
    """Scratch a failed training attempt may leave; cleaned without touching its state, so a
    retry still resumes."""
    return f"{prefix}tmp/"


# --- staging -----------------------------------------------------------------------------------


def staging_key(key: str) -> str:
    """Where a write lands before it is moved to ``key``: unique per write so two writers
    never meet, and keeping the file name so a stray one says what it was."""
    return f"tmp/{uuid.uuid4().hex}/{key.rsplit('/', 1)[-1]}"
