"""Uploads are read as a stream: the API key and the declared size are checked before any of
the body is read, the body goes to disk within its limit, and a large upload costs the gateway
almost no memory."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import RunningStack

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

BOUNDARY = "loomis-test-boundary"
MiB = 1024 * 1024
UPLOAD_ROUTES = {"/v1/uploads": "file", "/v1/loras": "file", "/v1/datasets": "files"}


def raw_post(url: str, path: str, headers: dict[str, str], body: bytes = b"",
             timeout: float = 15.0) -> tuple[int, dict[str, object]]:
    """Send the request line, the headers and only ``body``, then wait for an answer.

    The declared Content-Length is far larger than what is sent: an answer can only come from
    a gateway that decided without reading the body.
    """
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    lines = [f"POST {path} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}",
             *(f"{name}: {value}" for name, value in headers.items())]
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {received!r}"
            received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed inside the answer"
            rest += chunk
    return status, json.loads(rest[:length])


def part_head(field: str, filename: str) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()


def test_no_key_is_401_before_the_body_is_read(stack: RunningStack) -> None:
    for path, field in UPLOAD_ROUTES.items():
        status, problem = raw_post(stack.url, path, {
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Content-Length": str(600 * 1000 * 1000),
        }, part_head(field, "big.bin") + bytes(64 * 1024))
        assert (status, problem["code"]) == (401, "missing_api_key"), (path, problem)
        status, problem = raw_post(stack.url, path, {
            "Authorization": "Bearer lmk_not-a-key",
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Content-Length": str(600 * 1000 * 1000),
        }, part_head(field, "big.bin"))
        assert (status, problem["code"]) == (401, "invalid_api_key"), (path, problem)


def test_declared_size_over_the_limit_is_413_before_the_body_is_read(stack: RunningStack) -> None:
    over = {"/v1/uploads": 40 * MiB, "/v1/loras": 2 * 1024 * MiB + MiB,
            "/v1/datasets": 600 * 1000 * 1000}
    for path, field in UPLOAD_ROUTES.items():
        status, problem = raw_post(stack.url, path, {
            "Authorization": f"Bearer {stack.keys['alice']}",
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Content-Length": str(over[path]),
        })
        assert status == 413, (path, problem)
        assert problem["code"] == "payload_too_large"
        assert problem["errors"][0]["field"] == field  # type: ignore[index]


def test_chunked_body_is_cut_off_at_the_limit(stack: RunningStack) -> None:
    sent = [0]

    def body() -> Iterator[bytes]:  # chunked: no Content-Length to refuse up front
        yield part_head("file", "huge.png")
        for _ in range(48):
            sent[0] += MiB
            yield bytes(MiB)
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    with stack.client() as client:
        response = client.post("/v1/uploads", content=body(), headers={
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert response.status_code == 413, response.text
        assert response.json()["errors"][0]["field"] == "file"
        # Neither a text body nor a multipart body without a file is taken for an upload.
        wrong = client.post("/v1/uploads", content=b"hello", headers={"Content-Type": "text/plain"})
        assert (wrong.status_code, wrong.json()["code"]) == (415, "unsupported_media_type")
        empty = client.post("/v1/uploads", data={"other": "x"}, files={"x": ("a", b"", "text/plain")})
        assert empty.status_code == 422 and empty.json()["errors"][0]["field"] == "file"
        truncated = client.post("/v1/uploads", content=part_head("file", "a.png") + b"abc",
                                headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert (truncated.status_code, truncated.json()["code"]) == (400, "malformed_multipart")


def big_lora(path: Path, size: int) -> None:
    """A valid LoRA for tiny-sd15 of about ``size`` bytes: one self-attention layer of a huge
    rank, written without building it in memory."""
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    rank = size // (2 * 64 * 4)
    tensor_bytes = rank * 64 * 4
    header = json.dumps({
        f"{module}.lora_A.weight": {"dtype": "F32", "shape": [rank, 64],
                                    "data_offsets": [0, tensor_bytes]},
        f"{module}.lora_B.weight": {"dtype": "F32", "shape": [64, rank],
                                    "data_offsets": [tensor_bytes, 2 * tensor_bytes]},
    }).encode()
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        out.truncate(8 + len(header) + 2 * tensor_bytes)


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines()
                if line.startswith("VmRSS:"))


def test_a_large_upload_streams_through_the_gateway(stack: RunningStack, tmp_path: Path) -> None:
    gateway = next(child for child in stack.stack.children if child.name == "gateway")
    size = 200 * 1000 * 1000
    path = tmp_path / "big.safetensors"
    big_lora(path, size)
    baseline = rss(gateway.popen.pid)
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss(gateway.popen.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with stack.client() as client, path.open("rb") as file:
            client.timeout = httpx.Timeout(120)
            response = client.post("/v1/loras", data={"base_model": "tiny-sd15"},
                                   files={"file": ("Big Style.safetensors", file)})
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 201, response.text
    lora = response.json()
    assert (lora["size"], lora["name"], lora["rank"]) == (path.stat().st_size, "Big_Style",
                                                          size // 512)
    growth = peak[0] - baseline
    print(f"gateway RSS {baseline / MiB:.0f} MiB, peak during a {size / MiB:.0f} MiB upload "
          f"+{growth / MiB:.1f} MiB")
    assert growth < 64 * MiB, f"RSS grew by {growth / MiB:.0f} MiB for a {size / MiB:.0f} MiB upload"
    [key] = [key for key in stack.s3_keys("loras/") if f"/{lora['id']}/" in key]
    assert stack.s3.client().head_object(Bucket=stack.bucket, Key=key)["ContentLength"] == \
        path.stat().st_size
    with stack.client() as client:
        assert client.delete(f"/v1/loras/{lora['id']}").status_code == 204
