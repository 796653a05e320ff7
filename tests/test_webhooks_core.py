"""Webhook core: SSRF refusals before any connection, Standard Webhooks signatures that the
spec's own package verifies, and single delivery attempts against real receivers on loopback.

No traffic leaves the machine: every test of this module runs under an audit hook that blocks
(and records) any socket connection to a non-loopback address, and a hostname that must fail
to resolve is one the resolver rejects before asking any DNS server.
"""

from __future__ import annotations

import base64
import email.utils
import ipaddress
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from services.gateway.webhooks import sender
from services.gateway.webhooks.sender import SendResult, parse_retry_after, send
from services.gateway.webhooks.signing import new_secret, signature_header, webhook_headers
from services.gateway.webhooks.ssrf import UrlRefused, check_url, forbidden_reason, resolve_target

# --- no traffic beyond loopback --------------------------------------------------------------

_WATCHING: list[list[str]] = []  # the connection log of the running test, when one is watching


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "socket.connect" or not _WATCHING or not isinstance(args[1], tuple):
        return
    host = str(args[1][0])
    _WATCHING[-1].append(host)
    if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
        raise ConnectionRefusedError(f"test blocked a connection to {host}")


sys.addaudithook(_audit)  # hooks cannot be removed; it does nothing unless a test is watching


@pytest.fixture(autouse=True)
def connections() -> Iterator[list[str]]:
    """Addresses this test's code connected to; any non-loopback one is blocked."""
    log: list[str] = []
    _WATCHING.append(log)
    try:
        yield log
    finally:
        _WATCHING.remove(log)


# --- a real receiver ---------------------------------------------------------------------------

@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    server: ThreadingHTTPServer
    requests: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    sni: list[str | None] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        receiver: Receiver = self.server.receiver  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        path = self.path.split("?", 1)[0]
        receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                          body))
        status, headers, content = 200, {}, b"ok"
        if path == "/redirect":
            status, headers = 302, {"location": "/ok"}
        elif path == "/slow":
            receiver.release.wait(5)
        elif path == "/big":
            content = "é".encode() * 1000 + b"x" * 5000
        elif path == "/busy":
            status, headers = 429, {"retry-after": "2"}
        elif path == "/unavailable":
            when = datetime.now(UTC) + timedelta(seconds=30)
            status, headers = 503, {"retry-after": email.utils.format_datetime(when, usegmt=True)}
        elif path == "/ok-with-retry-after":
            headers = {"retry-after": "60"}
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(content)))
        self.end_headers()
        try:
            self.wfile.write(content)
        except (BrokenPipeError, ConnectionResetError):  # the sender stopped reading: fine
            pass


def start_receiver(tls: ssl.SSLContext | None = None) -> Receiver:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver = Receiver(server)
    server.receiver = receiver  # type: ignore[attr-defined]
    if tls is not None:
        tls.sni_callback = lambda _sock, name, _ctx: receiver.sni.append(name)
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return receiver


def stop_receiver(receiver: Receiver) -> None:
    receiver.release.set()
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.fixture(scope="module")
def receiver_() -> Iterator[Receiver]:
    receiver = start_receiver()
    yield receiver
    stop_receiver(receiver)


@pytest.fixture
def receiver(receiver_: Receiver) -> Receiver:
    receiver_.requests.clear()
    return receiver_


@pytest.fixture(scope="module")
def traps() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Listening sockets on 127.0.0.1 and ::1 (one port each) that no refused URL may reach."""
    v4 = socket.create_server(("127.0.0.1", 0))
    v6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
    for trap in (v4, v6):
        trap.setblocking(False)
    yield v4, v6
    v4.close()
    v6.close()


def assert_untouched(trap: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        trap.accept()


BODY = b'{"type":"job.succeeded","data":{"id":"j1","prompt":"caf\xc3\xa9"}}'


async def deliver(url: str, *, allow_private: bool = True, timeout_s: float = 5,
                  headers: dict[str, str] | None = None, **kwargs: Any) -> SendResult:
    return await send(url, body=BODY, headers=headers or {"content-type": "application/json"},
                      timeout_s=timeout_s, max_response_bytes=64 * 1024,
                      allow_private=allow_private, **kwargs)


# --- SSRF ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("ip", "reason"), [
    ("127.0.0.1", "loopback"), ("127.5.5.5", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("fc00::1", "private"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("100.64.0.1", "shared address space"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("::ffff:169.254.169.254", "cloud metadata"), ("::ffff:100.64.0.1", "shared"),
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("192.0.2.1", "private"),  # documentation range
    ("not-an-ip", "not an IP address"),
])
def test_forbidden_addresses_say_why(ip: str, reason: str) -> None:
    assert reason in (forbidden_reason(ip) or "")


@pytest.mark.parametrize("ip", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111",
                                "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_are_allowed(ip: str) -> None:
    assert forbidden_reason(ip) is None


def refused_urls(v4: int, v6: int) -> list[str]:
    return [
        f"http://127.0.0.1:{v4}/hook",
        f"http://[::1]:{v6}/hook",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        f"http://localhost:{v4}/hook",  # a hostname resolving to loopback
        f"http://127.1:{v4}/hook",  # shorthand that the resolver, not ipaddress, understands
        f"http://[::ffff:127.0.0.1]:{v4}/hook",
        f"http://0.0.0.0:{v4}/hook",
    ]


async def test_forbidden_targets_are_refused_before_any_connection(
        traps: tuple[socket.socket, socket.socket], connections: list[str]) -> None:
    v4, v6 = (trap.getsockname()[1] for trap in traps)
    for url in refused_urls(v4, v6):
        with pytest.raises(UrlRefused, match="webhooks may only call public addresses"):
            await check_url(url, allow_http=True, allow_private=False)
        result = await deliver(url, allow_private=False)
        assert result.status is None and result.error is not None, url
        assert result.error.startswith("refused: "), result.error
        assert result.retry_after_s is None and result.response_head == ""
    assert connections == []
    for trap in traps:
        assert_untouched(trap)


async def test_a_hostname_refusal_names_the_address() -> None:
    with pytest.raises(UrlRefused, match=r"'localhost' resolves to 127\.0\.0\.1, which is a "
                       "loopback address"):
        await check_url("https://localhost/hook", allow_http=False, allow_private=False)


async def test_private_networks_allowed_reach_loopback(receiver: Receiver,
                                                       connections: list[str]) -> None:
    for host in ("127.0.0.1", "localhost"):
        url = f"http://{host}:{receiver.port}/ok"
        await check_url(url, allow_http=True, allow_private=True)
        assert await resolve_target(url, allow_private=True) == (host, receiver.port,
                                                                 ["127.0.0.1"])
        result = await deliver(url)
        assert (result.status, result.error, result.response_head) == (200, None, "ok")
        assert result.ok and result.latency_ms > 0
        # Connected to the vetted address, while the receiver sees the URL's host.
        assert receiver.requests[-1].headers["host"] == f"{host}:{receiver.port}"
        assert receiver.requests[-1].body == BODY
    assert connections == ["127.0.0.1", "127.0.0.1"]


async def test_each_vetted_address_is_tried_in_turn(receiver: Receiver) -> None:
    """Nothing listens on ::1 at the receiver's port; the attempt moves on to 127.0.0.1."""
    status, content, _ = await sender._post(
        httpx.URL(f"http://localhost:{receiver.port}/ok"), host="localhost",
        addresses=["::1", "127.0.0.1"], body=BODY, headers={}, timeout_s=5,
        max_response_bytes=1024, ssl_context=sender.default_tls_context())
    assert (status, content) == (200, b"ok")


async def test_url_rules() -> None:
    with pytest.raises(UrlRefused, match="must use https"):
        await check_url("http://localhost/", allow_http=False, allow_private=True)
    await check_url("https://localhost/", allow_http=False, allow_private=True)
    for url, message in [
        ("ftp://localhost/", "must be http"),
        ("https://user:pass@localhost/", "must not carry credentials"),
        ("https:///path", "has no host"),
        ("https://localhost:99999/", "out of range"),
        ("not a url", "must be http"),
        ("https://exa\tmple.com/", "not a valid URL"),
        # The resolver rejects a 64-letter label before asking any DNS server.
        (f"https://{'a' * 64}.invalid/", "does not resolve"),
    ]:
        with pytest.raises(UrlRefused, match=message):
            await check_url(url, allow_http=True, allow_private=True)


# --- signing ---------------------------------------------------------------------------------

def test_new_secret_is_standard_webhooks_format() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32
    assert new_secret() != secret


async def test_every_secret_in_the_header_verifies_a_real_delivery(receiver: Receiver) -> None:
    old, new = new_secret(), new_secret()
    now = datetime.now(UTC)
    signature = signature_header([new, old], "msg_2Xk", now, BODY)
    assert signature.count("v1,") == 2 and len(signature.split(" ")) == 2
    await deliver(f"http://127.0.0.1:{receiver.port}/ok",
                  headers=webhook_headers("msg_2Xk", now, signature))
    got = receiver.requests[-1]
    assert got.headers["content-type"] == "application/json"
    assert got.headers["webhook-id"] == "msg_2Xk"
    assert got.headers["webhook-timestamp"] == str(int(now.timestamp()))
    for secret in (old, new):
        assert Webhook(secret).verify(got.body, got.headers) == {
            "type": "job.succeeded", "data": {"id": "j1", "prompt": "café"}}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(got.body, got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(got.body + b" ", got.headers)


def test_a_timestamp_signs_the_same_second_however_it_is_given() -> None:
    secret, seconds = new_secret(), 1_767_225_600
    as_int = signature_header([secret], "m", seconds, BODY)
    utc = datetime.fromtimestamp(seconds, UTC)
    assert signature_header([secret], "m", utc, BODY) == as_int
    assert signature_header([secret], "m", utc.astimezone(timezone(timedelta(hours=5))),
                            BODY) == as_int
    assert signature_header([secret], "m", utc.replace(tzinfo=None), BODY) == as_int
    assert webhook_headers("m", utc, as_int)["webhook-timestamp"] == str(seconds)
    with pytest.raises(ValueError):
        signature_header([], "m", seconds, BODY)


# --- one attempt -----------------------------------------------------------------------------

async def test_redirects_are_answers_not_followed(receiver: Receiver) -> None:
    result = await deliver(f"http://127.0.0.1:{receiver.port}/redirect")
    assert (result.status, result.error, result.ok) == (302, None, False)
    assert [r.path for r in receiver.requests] == ["/redirect"]


async def test_a_slow_receiver_times_out(receiver: Receiver) -> None:
    result = await deliver(f"http://127.0.0.1:{receiver.port}/slow", timeout_s=0.3)
    assert (result.status, result.error) == (None, "timeout after 0.3s")
    assert result.latency_ms < 2000


async def test_the_response_head_is_one_kib(receiver: Receiver) -> None:
    result = await deliver(f"http://127.0.0.1:{receiver.port}/big")
    assert result.status == 200
    assert result.response_head == "é" * 512  # 1024 bytes of two-byte characters
    assert receiver.requests[-1].headers["accept-encoding"] == "identity"


async def test_retry_after_is_read_on_429_and_503(receiver: Receiver) -> None:
    busy = await deliver(f"http://127.0.0.1:{receiver.port}/busy")
    assert (busy.status, busy.retry_after_s) == (429, 2.0)
    unavailable = await deliver(f"http://127.0.0.1:{receiver.port}/unavailable")
    assert unavailable.status == 503
    assert unavailable.retry_after_s is not None and 27 <= unavailable.retry_after_s <= 30
    ok = await deliver(f"http://127.0.0.1:{receiver.port}/ok-with-retry-after")
    assert (ok.status, ok.retry_after_s) == (200, None)


def test_retry_after_values() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:01:30 GMT", now=now) == 90.0
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now=now) == 0.0
    for junk in (None, "", "soon", "-5", "1.5"):
        assert parse_retry_after(junk, now=now) is None


async def test_a_closed_port_is_a_connection_error(traps: tuple[socket.socket, socket.socket]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    result = await deliver(f"http://127.0.0.1:{port}/ok")
    assert result.status is None and (result.error or "").startswith("connection failed: ")


async def test_logs_hold_no_secret_body_or_path(receiver: Receiver,
                                                caplog: pytest.LogCaptureFixture) -> None:
    secret, now = new_secret(), datetime.now(UTC)
    signature = signature_header([secret], "msg_1", now, BODY)
    with caplog.at_level(logging.DEBUG):
        await deliver(f"http://127.0.0.1:{receiver.port}/ok?token=receiver-token",
                      headers=webhook_headers("msg_1", now, signature))
        await deliver("http://10.0.0.1/hook?token=receiver-token", allow_private=False)
    assert "webhook attempt to 127.0.0.1" in caplog.text
    for leak in (secret, signature.split(",", 1)[1], "receiver-token", "café", "j1"):
        assert leak not in caplog.text


# --- TLS: connected to the vetted address, verified for the URL's hostname ------------------

def make_tls(tmp: Path, hostname: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for ``hostname`` and a client context trusting
    only its CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)

    def build(subject: str, issuer: str, key: Any, signer: Any, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5))
                   .not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       signer.public_key()), critical=False))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        else:
            builder = (builder
                       .add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]),
                                      critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                      critical=False))
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = build("Loomis test CA", "Loomis test CA", ca_key, ca_key, ca=True)
    leaf = build(hostname, "Loomis test CA", leaf_key, ca_key, ca=False)
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


async def test_tls_uses_the_urls_hostname_for_sni_and_verification(
        tmp_path: Path, connections: list[str]) -> None:
    server_tls, client_tls = make_tls(tmp_path, "localhost")
    receiver = start_receiver(server_tls)
    try:
        result = await deliver(f"https://localhost:{receiver.port}/ok", ssl_context=client_tls)
        assert (result.status, result.error) == (200, None)
        assert receiver.sni == ["localhost"]
        assert receiver.requests[-1].headers["host"] == f"localhost:{receiver.port}"
        assert connections == ["127.0.0.1"]
        # Same server and address, but the URL names the IP, which the certificate does not:
        # verification follows the URL, not the address connected to.
        refused = await deliver(f"https://127.0.0.1:{receiver.port}/ok", ssl_context=client_tls)
        assert refused.status is None
        assert "CERTIFICATE_VERIFY_FAILED" in (refused.error or ""), refused.error
        assert len(receiver.requests) == 1
    finally:
        stop_receiver(receiver)
