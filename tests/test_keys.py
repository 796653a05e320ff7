"""Storage keys: the layouts are pinned (stored objects are found by these exact strings), every
owner's keys lie under its prefix (so deleting the prefix deletes them), and no module but
``shared.keys`` builds a key."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from shared import keys

T, J, D, L, ITEM, U = "ten", "job", "dat", "lor", "itm", "0123abcd"
P, IMG, A, ASSET = "plc", "img", "act", "close-pose-0a1b"
TRAINING = keys.training_prefix(T, J)
TAGGING = keys.tagging_prefix(T, D, J)

LAYOUTS: list[tuple[str, str]] = [
    (keys.job_prefix(T, J), "outputs/ten/job/"),
    (keys.output_key(T, J, 3), "outputs/ten/job/3.png"),
    (keys.manifest_key(T, J), "outputs/ten/job/manifest.json"),
    (keys.contact_sheet_key(T, J), "outputs/ten/job/contact_sheet.png"),
    (keys.sweep_metadata_key(T, J), "outputs/ten/job/sweep.json"),
    (keys.uploads_prefix(T), "inputs/ten/uploads/"),
    (keys.upload_key(T, U), "inputs/ten/uploads/0123abcd.png"),
    (keys.dataset_prefix(T, D), "datasets/ten/dat/"),
    (keys.dataset_item_key(T, D, "10_sks dog/a.png"), "datasets/ten/dat/10_sks dog/a.png"),
    (keys.dataset_thumb_key(T, D, ITEM), "datasets/ten/dat/.thumbs/itm.jpg"),
    (keys.caption_key("datasets/ten/dat/10_sks dog/a.b.png", ".caption"),
     "datasets/ten/dat/10_sks dog/a.b.caption"),
    (TAGGING, "datasets/ten/dat/taggings/job/"),
    (keys.tagging_metadata_key(TAGGING), "datasets/ten/dat/taggings/job/metadata.json"),
    (keys.tagging_results_key(TAGGING), "datasets/ten/dat/taggings/job/results.json"),
    (keys.lora_prefix(T, L), "loras/ten/lor/"),
    (keys.lora_key(T, L), "loras/ten/lor/1.safetensors"),
    (keys.lora_key(T, L, 2), "loras/ten/lor/2.safetensors"),
    (keys.place_prefix(T, P), "places/ten/plc/"),
    (keys.place_image_key(T, P, IMG), "places/ten/plc/img.png"),
    (keys.place_thumb_key(T, P, IMG), "places/ten/plc/.thumbs/img.jpg"),
    (keys.action_prefix(T, A), "actions/ten/act/"),
    (keys.action_asset_key(T, A, ASSET), "actions/ten/act/close-pose-0a1b.png"),
    (TRAINING, "training/ten/job/"),
    (keys.training_sample_key(TRAINING, 40, 1), "training/ten/job/samples/step-000040-1.png"),
    (keys.training_checkpoint_key(TRAINING, 40),
     "training/ten/job/checkpoints/step-000040.safetensors"),
    (keys.training_state_prefix(TRAINING), "training/ten/job/state/"),
    (keys.training_state_key(TRAINING, 40), "training/ten/job/state/step-000040.tar"),
    (keys.training_metrics_key(TRAINING), "training/ten/job/metrics.json"),
    (keys.training_curve_key(TRAINING), "training/ten/job/loss_curve.png"),
    (keys.training_tmp_prefix(TRAINING), "training/ten/job/tmp/"),
]


@pytest.mark.parametrize(("built", "expected"), LAYOUTS, ids=[e for _, e in LAYOUTS])
def test_layout_is_pinned(built: str, expected: str) -> None:
    assert built == expected


def test_tenant_prefixes_are_every_root() -> None:
    assert keys.tenant_prefixes(T) == ("outputs/ten/", "inputs/ten/", "datasets/ten/",
                                       "loras/ten/", "training/ten/", "places/ten/",
                                       "actions/ten/")


def test_staging_key_is_unique_and_keeps_the_name() -> None:
    first, second = keys.staging_key("outputs/t/j/0.png"), keys.staging_key("outputs/t/j/0.png")
    assert first != second
    assert re.fullmatch(r"tmp/[0-9a-f]{32}/0\.png", first)


def test_state_step_reads_back_what_the_key_holds() -> None:
    for step in (0, 7, 40, 123456, 1234567):
        assert keys.training_state_step(keys.training_state_key(TRAINING, step)) == step


# (owner prefix, keys that must lie under it): deleting the prefix deletes each of them.
OWNED: list[tuple[str, list[str]]] = [
    (keys.job_prefix(T, J), [keys.output_key(T, J, 0), keys.manifest_key(T, J),
                             keys.contact_sheet_key(T, J), keys.sweep_metadata_key(T, J)]),
    (keys.uploads_prefix(T), [keys.upload_key(T, U)]),
    (keys.dataset_prefix(T, D), [
        keys.dataset_item_key(T, D, "10_sks dog/a.png"), keys.dataset_thumb_key(T, D, ITEM),
        keys.caption_key(keys.dataset_item_key(T, D, "img/a.png"), ".txt"), TAGGING,
        keys.tagging_metadata_key(TAGGING), keys.tagging_results_key(TAGGING)]),
    (keys.lora_prefix(T, L), [keys.lora_key(T, L), keys.lora_key(T, L, 9)]),
    (keys.place_prefix(T, P), [keys.place_image_key(T, P, IMG), keys.place_thumb_key(T, P, IMG)]),
    (keys.action_prefix(T, A), [keys.action_asset_key(T, A, ASSET)]),
    (TRAINING, [keys.training_sample_key(TRAINING, 1, 0), keys.training_checkpoint_key(TRAINING, 1),
                keys.training_state_prefix(TRAINING), keys.training_state_key(TRAINING, 1),
                keys.training_metrics_key(TRAINING), keys.training_curve_key(TRAINING),
                keys.training_tmp_prefix(TRAINING)]),
    (keys.training_state_prefix(TRAINING), [keys.training_state_key(TRAINING, 5)]),
]


@pytest.mark.parametrize(("prefix", "owned"), OWNED, ids=[p for p, _ in OWNED])
def test_owned_keys_lie_under_their_owner_and_tenant(prefix: str, owned: list[str]) -> None:
    assert prefix.endswith("/")
    assert any(prefix.startswith(root) for root in keys.tenant_prefixes(T))
    for key in owned:
        assert key.startswith(prefix), key
        assert key != prefix


def test_owners_do_not_overlap() -> None:
    """Deleting one owner never deletes another's objects (a job id that begins like another's
    is cut off by the trailing slash)."""
    prefixes: list[Callable[[str], str]] = [
        lambda x: keys.job_prefix(T, x), lambda x: keys.dataset_prefix(T, x),
        lambda x: keys.lora_prefix(T, x), lambda x: keys.training_prefix(T, x),
        lambda x: keys.tagging_prefix(T, D, x), lambda x: keys.place_prefix(T, x),
        lambda x: keys.action_prefix(T, x)]
    for prefix in prefixes:
        assert not prefix("ab12").startswith(prefix("ab1"))
    assert not keys.job_prefix("ab12", J).startswith(keys.job_prefix("ab1", J))
    for a in keys.tenant_prefixes("ab12"):
        assert not any(a.startswith(b) for b in keys.tenant_prefixes("ab1"))


ROOT = Path(__file__).resolve().parent.parent
# An f-string (any quote, any prefix combination holding f) with a key root followed by a field
# (not a URL path such as ``/v1/datasets/{id}``).
INLINE = re.compile(r"""\b[rRbB]?[fF][rRbB]?(['"]{1,3})[^'"\n]*?"""
                    r"""(?<![/\w])(outputs|inputs|uploads|datasets|loras|training|taggings|samples|"""
                    r"""places|actions|checkpoints|state|\.thumbs|tmp)/\{""")
# A prefix field followed by a path segment: ``f"{prefix}samples/…"``, ``f"{prefix}metrics.json"``.
PREFIX_JOIN = re.compile(r"""\{[^}]*(prefix|_key)[^}]*\}\.?[\w-]+"""
                         r"""(/|\.(png|jpe?g|json|tar|safetensors|txt|caption)\b)""")
# A prefix joined to a literal path: ``prefix + "sweep.json"``.
PREFIX_CONCAT = re.compile(r"""(prefix|_key)\s*\+\s*['"][^'"]*[./][^'"]*['"]""")


def test_no_module_but_keys_builds_a_key() -> None:
    offenders = []
    for folder in ("services", "shared"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "shared" / "keys.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                stripped = line.split("#", 1)[0]
                if INLINE.search(stripped) or PREFIX_CONCAT.search(stripped) or (
                        re.search(r"\bf['\"]", stripped) and PREFIX_JOIN.search(stripped)):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "build these keys in shared/keys.py:\n" + "\n".join(offenders)


def test_the_guard_catches_inline_keys() -> None:
    """The grep above would fail on what this refactor removed."""
    for line in ('key = f"outputs/{tenant}/{job}/0.png"',
                 "await store.delete_prefix(f'loras/{tenant.id}/{lora_id}/')",
                 'thumb_key = f"{prefix}.thumbs/{item_id}.jpg"',
                 'output_prefix=f"{prefix}taggings/{job_id}/"',
                 'key = f"{task.output_prefix}samples/step-{step:06d}-{index}.png"',
                 'stored = await store.get(f"{training_prefix(t, j)}metrics.json")',
                 'sheet = await _put(store, prefix + "contact_sheet.png", data)',
                 'key = task.output_prefix + "results.json"'):
        assert INLINE.search(line) or PREFIX_JOIN.search(line) or PREFIX_CONCAT.search(line), line
