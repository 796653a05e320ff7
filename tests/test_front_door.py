"""What a new user meets first: the docs pages, the OpenAPI document and the ``loomis`` CLI."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx
import pytest
from PIL import Image

from services.devstack import free_port
from tests.conftest import RunningStack, create_key

CLI = [sys.executable, "-m", "services.cli"]


class _AssetLinks(HTMLParser):
    """Every URL a page makes the browser fetch: scripts, styles, icons, ReDoc's spec-url."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and name in ("src", "href", "spec-url"):
                self.urls.append(value)


def test_docs_pages_load_every_asset_from_the_gateway(stack: RunningStack) -> None:
    gateway = urlparse(stack.url).netloc
    for page in ("/docs", "/redoc"):
        response = httpx.get(f"{stack.url}{page}")
        assert response.status_code == 200, response.text
        parser = _AssetLinks()
        parser.feed(response.text)
        assert any(url.endswith(".js") for url in parser.urls), parser.urls
        # Swagger UI's initialiser names the OpenAPI document in a script, not an attribute.
        assert "cdn." not in response.text and "fonts.googleapis" not in response.text
        for url in parser.urls:
            absolute = urljoin(f"{stack.url}{page}", url)
            assert urlparse(absolute).netloc == gateway, f"{page} loads {url} from elsewhere"
            asset = httpx.get(absolute)
            assert asset.status_code == 200, absolute
            assert len(asset.content) > 0


def test_openapi_has_bearer_auth_described_fields_and_the_event_stream(
    stack: RunningStack,
) -> None:
    spec = httpx.get(f"{stack.url}/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            expected = None if path in ("/healthz", "/readyz") else [{"bearerAuth": []}]
            if path.startswith(("/sdapi/", "/controlnet/")):  # webui clients send Basic
                expected = [{"basicAuth": []}, {"bearerAuth": []}]
            assert operation.get("security") == expected, f"{method.upper()} {path}"

    undescribed = [f"{name}.{prop}"
                   for name, schema in spec["components"]["schemas"].items()
                   for prop, definition in (schema.get("properties") or {}).items()
                   if not definition.get("description")]
    assert undescribed == []

    events = spec["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]
    assert list(events["content"]) == ["text/event-stream"]
    stream = events["content"]["text/event-stream"]["schema"]
    assert stream["type"] == "object" and stream["required"] == ["event", "id", "data"]
    data = stream["properties"]["data"]
    assert data["type"] == "string" and data["contentMediaType"] == "application/json"
    assert set(data["contentSchema"]["discriminator"]["mapping"]) == set(
        stream["properties"]["event"]["enum"]) == {
        "queued", "running", "progress", "sample", "succeeded", "failed", "canceled"}
    progress = spec["components"]["schemas"]["ProgressData"]["properties"]
    assert {"step", "total_steps", "progress", "epoch", "loss"} <= set(progress)


def _cli(*args: str, env: dict[str, str], timeout: float = 120, cwd: Path | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any LOOMIS_ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOMIS_")}
    env.update({"HF_HUB_OFFLINE": "1", **extra})
    return env


def test_generate_with_nothing_listening_is_one_clear_line(tmp_path: Path) -> None:
    port = free_port()
    result = _cli("generate", "a fox", "--api-key", "lmk_whatever",
                  env=_clean_env(LOOMIS_DATA_DIR=str(tmp_path), LOOMIS_GATEWAY__PORT=str(port)))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot reach the gateway at http://127.0.0.1:{port}" in lines[0]


def test_up_refuses_a_port_in_use_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = _cli("up", env=_clean_env(LOOMIS_DATA_DIR=str(tmp_path),
                                           LOOMIS_GATEWAY__PORT=str(port)), timeout=60)
    assert result.returncode == 1
    assert f"port {port} is in use" in result.stderr
    assert "exited" not in result.stderr and "alembic" not in result.stderr.lower()
    assert time.monotonic() - started < 30
    assert not (tmp_path / "logs" / "gateway.log").exists()


def test_stale_key_file_is_named_in_the_401(stack: RunningStack, tmp_path: Path) -> None:
    key_file = tmp_path / "dev-api-key"
    key_file.write_text("lmk_revoked_or_from_another_database\n")
    result = _cli("generate", "a fox", "--url", stack.url,
                  env=_clean_env(LOOMIS_DATA_DIR=str(tmp_path)))
    assert result.returncode == 1
    assert "HTTP 401" in result.stderr
    assert str(key_file.resolve()) in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_list_and_revoke(stack: RunningStack, tmp_path: Path) -> None:
    env = _clean_env(LOOMIS_DB__URL=stack.database_url, LOOMIS_DATA_DIR=str(tmp_path))
    tenant = f"dave-{tmp_path.name[-8:]}"
    key = _cli("keys", "create", "--tenant", tenant, "--name", "ci", env=env).stdout.strip()
    assert key.startswith("lmk_")
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{stack.url}/v1/jobs", headers=auth).status_code == 200

    listed = _cli("keys", "list", "--tenant", tenant, env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if key[:12] in line)
    assert tenant in row and " ci " in row and row.endswith("active")
    assert key not in listed.stdout  # only the prefix is ever shown

    revoked = _cli("keys", "revoke", key[:12], env=env)
    assert revoked.returncode == 0, revoked.stderr
    response = httpx.get(f"{stack.url}/v1/jobs", headers=auth)
    assert response.status_code == 401 and response.json()["code"] == "invalid_api_key"
    row = next(line for line in _cli("keys", "list", "--tenant", tenant, env=env).stdout
               .splitlines() if key[:12] in line)
    assert "revoked" in row

    missing = _cli("keys", "revoke", "lmk_nosuchkey", env=env)
    assert missing.returncode == 1 and "no API key" in missing.stderr
    other = create_key(stack.database_url, "alice")  # other tenants' keys are untouched
    assert httpx.get(f"{stack.url}/v1/jobs",
                     headers={"Authorization": f"Bearer {other}"}).status_code == 200


@pytest.fixture
def loomis_up(tmp_path: Path, model_cache: Path) -> Iterator[dict[str, Any]]:
    """`loomis up` as a user runs it, with the port chosen by LOOMIS_GATEWAY__PORT only."""
    with _loomis_up(tmp_path, model_cache) as running:
        yield running


@contextlib.contextmanager
def _loomis_up(tmp_path: Path, model_cache: Path, *,
               sigint_ignored: bool = False) -> Iterator[dict[str, Any]]:
    port = free_port()
    env = _clean_env(LOOMIS_DATA_DIR=str(tmp_path / "data"), LOOMIS_GATEWAY__PORT=str(port),
                     LOOMIS_MODELS__CACHE_DIR=str(model_cache))
    log = (tmp_path / "up.log").open("w")

    def ignore_sigint() -> None:  # what `loomis up &` in a non-interactive shell inherits
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    process = subprocess.Popen([*CLI, "up"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=ignore_sigint if sigint_ignored else None)
    try:
        deadline = time.monotonic() + 240
        while "Loomis is up" not in (tmp_path / "up.log").read_text():
            assert process.poll() is None, (tmp_path / "up.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        yield {"port": port, "env": env, "process": process, "log": tmp_path / "up.log"}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        log.close()


def test_up_serves_where_the_settings_say_and_generate_finds_it(
    loomis_up: dict[str, Any], tmp_path: Path,
) -> None:
    port, env = loomis_up["port"], loomis_up["env"]
    assert f"Loomis is up: http://127.0.0.1:{port}" in loomis_up["log"].read_text()
    assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200

    # No --url and no --api-key: the same settings and the key file `loomis up` wrote.
    out = tmp_path / "fox.png"
    made = _cli("generate", "a red fox", "-o", str(out), "--steps", "2", env=env, timeout=180)
    assert made.returncode == 0, made.stderr
    assert Image.open(out).size == (64, 64)

    second = _cli("up", env=env, timeout=60)
    assert second.returncode == 1
    assert f"port {port} is in use" in second.stderr

    process = loomis_up["process"]
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0


def test_up_started_with_sigint_ignored_stops_on_sigint(tmp_path: Path, model_cache: Path) -> None:
    import psutil

    with _loomis_up(tmp_path, model_cache, sigint_ignored=True) as running:
        process = running["process"]
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 4  # redis, gateway, generator, tagger, trainer
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, running["log"].read_text()
        assert "stopped" in running["log"].read_text()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive
