"""The per-tenant output safety filter end to end (the real open_nsfw classifier)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.conftest import RunningStack, create_key, wait_terminal
from tests.test_modes_e2e import BASE, images_of

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)


def set_policy(stack: RunningStack, tenant: str, *args: str) -> None:
    env = {**os.environ, "LOOMIS_DB__URL": stack.database_url}
    done = subprocess.run([sys.executable, "-m", "services.cli", "tenants", "safety", "--tenant",
                           tenant, *args], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_safety_filter_withholds_or_blurs_above_threshold(stack: RunningStack) -> None:
    key = create_key(stack.database_url, "carol")
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=30) as client:
        def generate() -> dict:  # type: ignore[type-arg]
            response = client.post("/v1/generations", json={**BASE, "num_images": 2})
            assert response.status_code == 202, response.text
            return wait_terminal(client, response.json()["id"])

        plain = generate()
        assert "safety" not in plain["result"]
        clean = images_of(plain)

        set_policy(stack, "carol", "--action", "withhold", "--threshold", "0")
        withheld = generate()
        assert withheld["status"] == "succeeded"
        assert withheld["result"]["withheld"] == [0, 1]
        assert all(0 <= s["score"] <= 1 and s["flagged"] for s in withheld["result"]["safety"])
        assert [a["kind"] for a in withheld["artifacts"]] == ["manifest"]

        set_policy(stack, "carol", "--action", "blur", "--threshold", "0")
        blurred = generate()
        assert blurred["result"]["withheld"] == []
        images = images_of(blurred)
        assert len(images) == 2 and images[0].shape == clean[0].shape
        assert images[0].astype(float).std() < clean[0].astype(float).std()

        set_policy(stack, "carol", "--action", "blur", "--threshold", "1")
        passed = generate()
        assert not any(s["flagged"] for s in passed["result"]["safety"])
        assert np.array_equal(images_of(passed)[0], clean[0])
