"""The CLI against a running stack on embedded storage, and both storage backends directly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import pytest
from PIL import Image

from services.gateway.files.stores import LocalStore, S3Store
from shared.errors import NotFound
from shared.storage import ObjectStore
from tests.conftest import S3Server, launch_stack, wait_terminal


def test_cli_generate_and_signed_local_downloads(
    tmp_path: Path, s3_server: S3Server, model_cache: Path
) -> None:
    running = launch_stack(
        tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", s3=s3_server,
        model_cache=model_cache, extra_env={"LOOMIS_STORAGE__BACKEND": "local"},
    )
    env = {**os.environ, "LOOMIS_DB__URL": running.database_url, "LOOMIS_DATA_DIR": str(tmp_path)}
    try:
        created = subprocess.run(
            [sys.executable, "-m", "services.cli", "keys", "create", "--tenant", "carol"],
            env=env, capture_output=True, text=True, check=True,
        )
        key = created.stdout.strip()
        assert key.startswith("lmk_")
        out = tmp_path / "fox.png"
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "generate", "a red fox in snow", "-o", str(out),
             "--url", running.url, "--api-key", key, "--steps", "2", "--seed", "3"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert f"saved {out}" in result.stdout and "timings:" in result.stdout
        assert Image.open(out).size == (64, 64)

        bad = subprocess.run(
            [sys.executable, "-m", "services.cli", "generate", "x", "--url", running.url,
             "--api-key", key, "--width", "13"], env=env, capture_output=True, text=True,
        )
        assert bad.returncode == 1 and "width" in bad.stderr

        with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {key}"}) as c:
            job = wait_terminal(c, c.get("/v1/jobs").json()["items"][0]["id"])
        url = next(a["url"] for a in job["artifacts"] if a["kind"] == "image")
        assert url.startswith(f"{running.url}/v1/files/outputs/")
        assert httpx.get(url).status_code == 200
        parts = urlparse(url)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        forged = {**query, "signature": "0" * 64}
        other_key = parts.path.replace("0.png", "manifest.json")
        for tampered in (
            f"{running.url}{parts.path}?{urlencode(forged)}",
            f"{running.url}{other_key}?{parts.query}",
            f"{running.url}{parts.path}?{urlencode({**query, 'expires': int(query['expires']) + 1})}",
        ):
            response = httpx.get(tampered)
            assert response.status_code == 401, tampered
            assert response.json()["code"] == "invalid_signature"
    finally:
        running.stack.stop()
        running.redis.stop()


def _s3(s3_server: S3Server, bucket: str) -> S3Store:
    return S3Store(bucket=bucket, endpoint_url=s3_server.url, region="us-east-1",
                   access_key_id="test", secret_access_key="test", presign_expires_s=60,
                   create_bucket=True)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, s3_server: S3Server) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "objects", public_url="http://x", secret="s",
                          presign_expires_s=60)
    return _s3(s3_server, f"store-{tmp_path.name[-20:].lower().replace('_', '-')}")


def test_store_round_trip_leaves_no_temporary_objects(store: ObjectStore) -> None:
    async def run() -> None:
        await store.put("outputs/t/j/0.png", b"first", content_type="image/png")
        await store.put("outputs/t/j/0.png", b"second", content_type="image/png")
        await store.put("outputs/t/j/manifest.json", b"{}", content_type="application/json")
        assert await store.get("outputs/t/j/0.png") == b"second"
        assert await store.list("") == ["outputs/t/j/0.png", "outputs/t/j/manifest.json"]
        await store.delete_prefix("outputs/t/j/")
        assert await store.list("outputs/") == []
        with pytest.raises(NotFound):
            await store.get("outputs/t/j/0.png")
        await store.check()

    asyncio.run(run())


def test_s3_presigned_url_downloads_over_http(s3_server: S3Server) -> None:
    store = _s3(s3_server, "presign-test")
    asyncio.run(store.put("a/b.png", b"png-bytes", content_type="image/png"))
    response = httpx.get(store.presign_get("a/b.png"))
    assert response.status_code == 200 and response.content == b"png-bytes"
    assert response.headers["content-type"] == "image/png"


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:5000", "https://s3.example.com",
                                      "http://s3.example.com:80", "http://minio:9000/sub"])
def test_s3_presigner_signs_what_botocore_signs(endpoint: str) -> None:
    """The gateway signs URLs itself for speed; for the same instant they must be botocore's."""
    from datetime import UTC, datetime

    store = S3Store(bucket="bkt-1", endpoint_url=endpoint, region="eu-west-1",
                    access_key_id="AKID", secret_access_key="sec/ret+", presign_expires_s=60,
                    create_bucket=False)
    assert store.presigner is not None
    for key in ("outputs/t/j/0.png", "in puts/ü/a+b=c&d~e!'()*.png", "x//y"):
        expected = store.client.generate_presigned_url(
            "get_object", Params={"Bucket": "bkt-1", "Key": key}, ExpiresIn=900)
        stamp = parse_qs(urlparse(expected).query)["X-Amz-Date"][0]
        now = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        assert store.presigner.presign_get("bkt-1", key, expires_s=900, now=now) == expected


def test_local_store_refuses_paths_outside_its_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects", public_url="http://x", secret="s",
                       presign_expires_s=60)
    with pytest.raises(NotFound):
        store.path_for("../escape.txt")
