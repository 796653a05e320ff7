"""The README's webhook receiver, run as written: it verifies a real delivery from a stack."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.devstack import free_port, wait_port
from tests.conftest import RunningStack

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_receiver() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
              if "standardwebhooks" in b]
    assert len(blocks) == 1, "the README's webhook receiver was not found"
    return blocks[0]


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_the_readme_receiver_verifies_a_delivery(stack: RunningStack, tmp_path: Path) -> None:
    script = tmp_path / "receiver.py"
    script.write_text(readme_receiver())
    port = free_port()
    with stack.client() as client:
        hook = client.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{port}/hook"}).json()
        out = (tmp_path / "out.txt").open("w")
        receiver = subprocess.Popen([sys.executable, str(script)], stdout=out,
                                    stderr=subprocess.STDOUT,
                                    env={"WEBHOOK_SECRET": hook["secret"], "PORT": str(port),
                                         "PATH": "/usr/bin:/bin"})
        try:
            wait_port(port)
            assert client.post(f"/v1/webhooks/{hook['id']}/test").status_code == 202
            deadline = time.monotonic() + 30
            while "ping" not in (tmp_path / "out.txt").read_text():
                assert time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
                time.sleep(0.1)
            log = client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"][0]
            assert log["attempts"][0]["status_code"] == 204
        finally:
            receiver.terminate()
            receiver.wait(10)
            client.delete(f"/v1/webhooks/{hook['id']}")
