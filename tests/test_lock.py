"""The installed environment is exactly the lock, and the lock agrees with pyproject.toml.

A fresh clone once resolved a newer `transformers` than the developer machine had, and
`make test` broke on every new machine while CI stayed green. These checks make drift loud:
the venv running the tests must hold every locked package at its locked version and nothing
unlocked, and both lock files must satisfy the ranges pyproject.toml declares.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CPU_LOCK = ROOT / "requirements" / "cpu.txt"
CUDA_LOCK = ROOT / "requirements" / "cuda.txt"
# Tools of the venv itself, not of the project.
VENV_TOOLS = {"pip", "setuptools", "wheel", "loomis"}


def read_lock(path: Path) -> dict[str, str]:
    """`name==version` lines of a uv/pip-compile lock, comments and options left out."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==(\S+)", line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        pins[canonicalize_name(match.group(1))] = match.group(3)
    return pins


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def test_venv_matches_the_cpu_lock() -> None:
    pins, have = read_lock(CPU_LOCK), installed()
    missing = sorted(f"{n}=={v}" for n, v in pins.items() if n not in have)
    wrong = sorted(f"{n}: locked {v}, installed {have[n]}" for n, v in pins.items()
                   if n in have and Version(have[n]) != Version(v))
    unlocked = sorted(f"{n}=={v}" for n, v in have.items() if n not in pins and n not in VENV_TOOLS)
    assert not missing and not wrong and not unlocked, (
        "the venv drifted from requirements/cpu.txt (rebuild it with `rm -rf .venv && make install`, "
        f"or re-lock with `make lock`): missing={missing} wrong={wrong} unlocked={unlocked}")


def test_pip_check_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _project_requirements(extras: set[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize(("lock", "extras"), [(CPU_LOCK, {"worker", "dev"}), (CUDA_LOCK, {"worker"})],
                         ids=["cpu", "cuda"])
def test_lock_satisfies_pyproject(lock: Path, extras: set[str]) -> None:
    pins = read_lock(lock)
    for req in _project_requirements(extras):
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock.name} lacks {req.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock.name} pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}: "
            "run `make lock`")


def test_both_locks_agree_on_shared_packages() -> None:
    """The CPU lock is what is tested; the CUDA images must run the same library versions."""
    cpu, cuda = read_lock(CPU_LOCK), read_lock(CUDA_LOCK)
    differ = sorted(f"{n}: cpu {cpu[n]}, cuda {cuda[n]}" for n in cpu.keys() & cuda.keys()
                    if Version(cpu[n]).public != Version(cuda[n]).public)
    assert not differ, differ


def test_cpu_lock_never_pulls_cuda_torch() -> None:
    pins = read_lock(CPU_LOCK)
    assert pins["torch"].endswith("+cpu")
    assert not [n for n in pins if n.startswith("nvidia-") or n == "triton"]

