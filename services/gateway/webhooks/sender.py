"""One delivery attempt, over a connection only to an address vetted a moment before.

The URL's host is resolved by :func:`~services.gateway.webhooks.ssrf.resolve_target` and the
request goes to one of those addresses, with the URL's Host header and, over TLS, its hostname
as SNI and as the name the certificate must match. Letting the client resolve the name again
would connect to whatever DNS says by then (DNS rebinding). Redirects are not followed (a
redirect is the receiver's answer, and its target was never vetted); responses are read only
up to a cap, so a hostile receiver cannot make the gateway buffer gigabytes.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

import httpx

from services.gateway.webhooks.ssrf import UrlRefused, resolve_target

logger = logging.getLogger(__name__)

RESPONSE_HEAD_BYTES = 1024  # what the delivery log keeps of a response
USER_AGENT = "Loomis-Webhooks/1"
RETRY_AFTER_STATUSES = {429, 503}


@dataclass
class SendResult:
    """What one attempt came to: a response (``status``) or an ``error``, never both."""

    status: int | None
    latency_ms: float
    response_head: str
    error: str | None
    retry_after_s: float | None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@cache
def default_tls_context() -> ssl.SSLContext:
    """httpx's verifying context (certifi, or SSL_CERT_FILE), built once: loading the CA
    bundle costs milliseconds, and every attempt opens a fresh client."""
    return httpx.create_ssl_context()


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for, given as seconds or as an HTTP date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


async def _read_capped(response: httpx.Response, limit: int) -> bytes:
    # Raw bytes: the request asked for no compression, and decoding a compressed body that
    # came anyway could inflate one small chunk far past the cap.
    read, size = [], 0
    async for chunk in response.aiter_raw():
        read.append(chunk[:limit - size])
        size += len(read[-1])
        if size >= limit:
            break
    return b"".join(read)


async def _post(url: httpx.URL, *, host: str, addresses: list[str], body: bytes,
                headers: dict[str, str], timeout_s: float, max_response_bytes: int,
                ssl_context: ssl.SSLContext) -> tuple[int, bytes, str | None]:
    """Status, capped body and Retry-After of the first address that takes the connection."""
    ours = {"host": url.netloc.decode("ascii"), "user-agent": USER_AGENT,
            "accept-encoding": "identity"}
    headers = {**{k: v for k, v in headers.items() if k.lower() not in ours}, **ours}
    extensions = {"sni_hostname": host, "timeout": httpx.Timeout(timeout_s).as_dict()}
    # The transport, not a client: a client follows proxies from the environment, and logs
    # every request's full URL at INFO (a receiver's URL may carry its token). A fresh one
    # without keep-alive: pooled connections are keyed by address, and one verified for one
    # hostname must never carry a request for another hostname on the same address.
    async with httpx.AsyncHTTPTransport(verify=ssl_context, trust_env=False,
                                        limits=httpx.Limits(max_keepalive_connections=0)
                                        ) as transport:
        refused: httpx.ConnectError | None = None
        for address in addresses:
            request = httpx.Request("POST", url.copy_with(host=address), content=body,
                                    headers=headers, extensions=extensions)
            try:
                response = await transport.handle_async_request(request)
            except httpx.ConnectError as exc:  # nothing was sent; the next address may answer
                refused = exc
                continue
            try:
                content = await _read_capped(response, max_response_bytes)
            finally:
                await response.aclose()
            return response.status_code, content, response.headers.get("retry-after")
    raise refused or httpx.ConnectError("no address to connect to")


async def send(url: str, *, body: bytes, headers: dict[str, str], timeout_s: float,
               max_response_bytes: int, allow_private: bool,
               ssl_context: ssl.SSLContext | None = None) -> SendResult:
    """POST ``body`` to ``url`` once and say how it went; never raises for the receiver's sake.

    ``timeout_s`` bounds the whole attempt, resolution included. ``ssl_context`` defaults to
    :func:`default_tls_context`; tests pass one that trusts their own CA.
    """
    started = time.perf_counter()
    status: int | None = None
    content, retry_after, error, host = b"", None, None, "-"
    try:
        async with asyncio.timeout(timeout_s):
            host, _, addresses = await resolve_target(url, allow_private=allow_private)
            status, content, retry_after = await _post(
                httpx.URL(url), host=host, addresses=addresses, body=body, headers=headers,
                timeout_s=timeout_s, max_response_bytes=max_response_bytes,
                ssl_context=ssl_context or default_tls_context())
    except UrlRefused as exc:
        error = f"refused: {exc}"
    except (TimeoutError, httpx.TimeoutException):
        error = f"timeout after {timeout_s:g}s"
    except httpx.ConnectError as exc:
        error = f"connection failed: {str(exc) or type(exc).__name__}"
    except httpx.HTTPError as exc:  # the receiver broke the exchange off (or spoke no HTTP)
        error = f"{type(exc).__name__}: {exc}"
    latency_ms = (time.perf_counter() - started) * 1000
    # The host only: paths and queries may carry a receiver's token.
    logger.debug("webhook attempt to %s: status=%s error=%s in %.0f ms",
                 host, status, error, latency_ms)
    return SendResult(
        status=status,
        latency_ms=latency_ms,
        response_head=content[:RESPONSE_HEAD_BYTES].decode("utf-8", errors="replace"),
        error=error,
        retry_after_s=parse_retry_after(retry_after) if status in RETRY_AFTER_STATUSES else None,
    )
