"""The README's curl examples, run as written against a real stack.

The README says they run in the directory where ``loomis up`` runs, after ``loomis
examples``, with only the base URL and ``KEY`` changed for another gateway: that is exactly
what this test substitutes, nothing else.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import RunningStack, create_key, wait_terminal

README = Path(__file__).resolve().parent.parent / "README.md"
README_URL = "http://127.0.0.1:8000"


def readme_curl_blocks() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    return [block for block in blocks if "curl " in block]


# The examples document the API, not a database: one backend is enough for them.
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True, scope="session")
def test_readme_curl_examples_run_as_written(stack: RunningStack, tmp_path: Path) -> None:
    for tool in ("curl", "jq"):
        assert shutil.which(tool), f"{tool} is not installed (make test installs it with apt)"
    blocks = readme_curl_blocks()
    assert len(blocks) >= 3, "the README's curl examples were not found"
    assert all(README_URL in block for block in blocks)
    tenant = f"readme-{uuid.uuid4().hex[:8]}"
    key = create_key(stack.database_url, tenant)
    (tmp_path / ".loomis").mkdir()
    (tmp_path / ".loomis" / "dev-api-key").write_text(key + "\n")
    subprocess.run([sys.executable, "-m", "services.cli", "examples"], cwd=tmp_path,
                   check=True, capture_output=True, timeout=120)
    # the Scenes walk-through's first step, for this tenant (the README's is `--tenant dev`)
    assert "loomis scenes demo-catalog --tenant dev" in README.read_text()
    subprocess.run([sys.executable, "-m", "services.cli", "scenes", "demo-catalog", "--tenant",
                    tenant], env=stack.stack.child_env(), check=True, capture_output=True,
                   timeout=300)

    # Every curl fails on an HTTP error, and the script stops at the first failing command.
    script = ["set -euo pipefail",
              'curl() { command curl --fail-with-body --max-time 120 "$@"; }']
    for index, block in enumerate(blocks):
        script += [f"echo '### README curl block {index}' >&2", block.replace(README_URL, stack.url)]
    result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{result.stderr[-3000:]}\n{result.stdout[-3000:]}"

    with httpx.Client(base_url=stack.url, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        jobs = client.get("/v1/jobs").json()["items"]
        assert sorted(job["kind"] for job in jobs) == [
            "generation", "generation", "generation", "scene", "tagging"]
        for job in jobs:
            finished = wait_terminal(client, job["id"], timeout=240)
            assert finished["status"] == "succeeded", finished
        with_lora = next(job for job in jobs if job["spec"].get("loras"))
        assert with_lora["spec"]["loras"][0]["weight"] == pytest.approx(0.8)
    with Image.open(tmp_path / "scene.png") as scene:  # the walk-through's image
        assert scene.size[0] > 0
    names = zipfile.ZipFile(tmp_path / "dogs-kohya.zip").namelist()
    assert "dataset_config.toml" in names
    assert sum(name.endswith(".png") for name in names) == 4
