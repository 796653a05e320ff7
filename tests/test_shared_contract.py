"""``shared/`` is the contract between the gateway and the workers, and stays that.

It is installed with every service, the gateway's light image included, so it must not pull
in torch, FastAPI or SQLAlchemy. Code that only one service uses belongs in that service: in
``shared/`` it would grow a second home for one concern and make every image carry it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "shared"
SERVICES = ROOT / "services"

FORBIDDEN = ("torch", "fastapi", "starlette", "sqlalchemy", "alembic", "diffusers", "transformers")

# Issue 12 aims at about 3,000 lines. This ceiling is a ratchet: lower it whenever code
# leaves shared/, never raise it without saying in the commit which contract grew.
# 3,600 after the kohya dataset config parser, LoRA inspection, single-consumer spec helpers,
# pose drawing and the tokenizers moved out; 3,400 after upload streaming and download-link
# signing (to the gateway's files/stores.py), the optimizer package check, the per-kind outcome
# lookups and the kohya sampler -> scheduler map moved out; raised to 3,650 for the scene job's
# contract (shared/specs/scene.py, SceneOutcome), to 3,700 for the scenes catalog's keys and
# to 3,750 for the webhooks' settings (LOOMIS_WEBHOOKS__*), to 3,800 for the per-job webhook
# every job spec takes (WebhookTarget), to 3,850 for the LoRA evictions stream workers follow
# (shared/evictions.py), to 3,875 for subjects: a scene subject named by id, the LoRA's subject
# on LoraRef (manifests name it), blinded eviction digests and the chain's sweep setting; to
# 3,900 for the compatibility adapters' settings (LOOMIS_COMPAT__*) and an img2img prompt that
# may be empty; to 3,925 for the queue recovery's setting (and JobEvents.create's commands in a
# caller's pipeline, which a submission sends with its pending task) and DDIM's eta
MAX_SHARED_LINES = 3_925

# shared modules allowed a single consumer, each with the reason; empty while none needs it.
SINGLE_CONSUMER_ALLOWED: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> Iterator[str]:
    """Every module ``path`` imports, anywhere in it, as absolute names (``from shared import
    keys`` yields ``shared`` and ``shared.keys``)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def consumer_of(path: Path) -> str:
    """Who a file speaks for: a service package (``services.gateway``), a top-level services
    module (``services.cli``, ``services.jobrunner``), or a shared module (``shared.kohya``)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return f"{parts[0]}.{parts[1]}"


def shared_modules() -> list[str]:
    names = {consumer_of(path) for path in SHARED.rglob("*.py") if path.name != "__init__.py"
             or path.parent != SHARED}
    return sorted(names)


def consumers() -> dict[str, set[str]]:
    """For each shared module, the services and other shared modules importing it (tests and
    benchmarks are not consumers)."""
    modules = shared_modules()
    found: dict[str, set[str]] = defaultdict(set)
    for path in [*SERVICES.rglob("*.py"), *SHARED.rglob("*.py")]:
        consumer = consumer_of(path)
        for name in imported_modules(path):
            for module in modules:
                if consumer != module and (name == module or name.startswith(module + ".")):
                    found[module].add(consumer)
    return found


def test_shared_imports_no_heavy_or_server_framework() -> None:
    offending = []
    for path in sorted(SHARED.rglob("*.py")):
        for name in imported_modules(path):
            if name.split(".")[0] in FORBIDDEN:
                offending.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offending == []


def test_shared_stays_small() -> None:
    lines = sum(len(path.read_text(encoding="utf-8").splitlines()) for path in SHARED.rglob("*.py"))
    print(f"shared/ holds {lines} lines")
    assert lines <= MAX_SHARED_LINES


def test_no_shared_module_has_a_single_consumer() -> None:
    found = consumers()
    single = {module: sorted(found.get(module, ())) for module in shared_modules()
              if len(found.get(module, ())) < 2 and module not in SINGLE_CONSUMER_ALLOWED}
    assert single == {}, "move these into their one consumer, or allow-list them with a reason"


def test_the_allow_list_is_not_stale() -> None:
    found = consumers()
    assert {module for module in SINGLE_CONSUMER_ALLOWED if len(found.get(module, ())) >= 2} == set()
    assert set(SINGLE_CONSUMER_ALLOWED) <= set(shared_modules())


def test_the_walk_sees_the_contract_from_both_sides() -> None:
    """The consumer count is only as good as the walk; the job specs are used on both sides."""
    found = consumers()
    assert {"services.gateway", "services.generator", "services.trainer",
            "services.tagger"} <= found["shared.specs"]
    assert "shared.training" in found["shared.kohya"]
