"""Helpers for the subject tests: photos, a subject made in one call, and the whole-system scan
that proves a subject is forgotten."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis
from PIL import Image

from tests.conftest import RunningStack


def photos(count: int = 5, *, seed: int = 11, side: int = 64) -> list[bytes]:
    """Distinct stand-ins for a person's photos: a face-like blob on noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pixels = (rng.random((side, side, 3)) * 255).astype(np.uint8)
        pixels[side // 4: 3 * side // 4, side // 3: 2 * side // 3] = rng.integers(150, 230, 3)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


CONSENT = "Given by the person pictured, for making portraits of them in this app."


def create(client: httpx.Client, images: list[bytes], **fields: Any) -> httpx.Response:
    data = {"name": "Test Person", "class_word": "woman", "preset": "quick",
            "consent": CONSENT, **{k: (json.dumps(v) if isinstance(v, dict) else str(v).lower()
                                       if isinstance(v, bool) else str(v))
                                   for k, v in fields.items()}}
    files = [("photos", (f"p{i}.png", image, "image/png")) for i, image in enumerate(images)]
    return client.post("/v1/subjects", data=data, files=files)


def wait_subject(client: httpx.Client, subject_id: str, statuses: tuple[str, ...],
                 timeout: float = 300.0, *, purged: bool = False) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(f"/v1/subjects/{subject_id}").json()
        if body.get("status") in statuses and (not purged or body.get("purged")):
            return body
        time.sleep(0.2)
    raise AssertionError(f"subject {subject_id} not {statuses} after {timeout}s: {body}")


def scan(stack: RunningStack, model_dirs: list[Path], needles: dict[str, str],
         *, skip_keys: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Where each needle (name -> string) still appears: S3 keys and object bodies, every SQL
    table's rows, the files under the workers' model caches (names and small files), and every
    Redis key and value. Empty lists everywhere: forgotten."""
    found: dict[str, list[str]] = {name: [] for name in needles}

    def check(where: str, text: str | bytes) -> None:
        blob = text.encode() if isinstance(text, str) else text
        for name, needle in needles.items():
            if needle.encode() in blob:
                found[name].append(where)

    s3 = stack.s3.client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            check(f"s3 key {key}", key)
            if not key.startswith(skip_keys):
                body = s3.get_object(Bucket=stack.bucket, Key=key)["Body"].read()
                check(f"s3 object {key}", body)
                check(f"s3 object {key} is a photo", sha(body))  # the bytes themselves
    url = stack.database_url
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split("///", 1)[1])
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type='table'")]
        for table in tables:
            for row in conn.execute(f'select * from "{table}"'):
                check(f"sql {table}", repr(row))
        conn.close()
    else:
        import psycopg

        with psycopg.connect(url.replace("postgresql+asyncpg://", "postgresql://")) as conn:
            tables = [r[0] for r in conn.execute(
                "select tablename from pg_tables where schemaname = 'public'")]
            for table in tables:
                for row in conn.execute(f'select * from "{table}"'):
                    check(f"sql {table}", repr(row))
    for root in model_dirs:
        for path in root.rglob("*"):
            check(f"file {path}", str(path.relative_to(root)))
            if path.is_file() and path.stat().st_size < 1_000_000:
                check(f"file {path}", path.read_bytes())
    r = redis.Redis.from_url(stack.redis.url)
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        name = key.decode(errors="replace")
        check(f"redis key {name}", key)
        if kind == "string":
            check(f"redis {name}", r.get(key) or b"")
        elif kind == "hash":
            check(f"redis {name}", repr(r.hgetall(key)))
        elif kind == "list":
            check(f"redis {name}", repr(r.lrange(key, 0, -1)))
        elif kind == "set":
            check(f"redis {name}", repr(r.smembers(key)))
        elif kind == "zset":
            check(f"redis {name}", repr(r.zrange(key, 0, -1)))
        elif kind == "stream":
            check(f"redis {name}", repr(r.xrange(key)))
    return {name: where for name, where in found.items() if where}
