"""Which webhook URLs the gateway may call, checked at registration and again at send time.

A tenant names the URL, so an unchecked one would let it make the gateway call whatever the
gateway can reach: the cloud's metadata service (credentials), Redis, the database, the admin
port of a neighbour. A hostname is resolved and every address vetted, because DNS is the
tenant's too: a name may point at 127.0.0.1 today or change between the check and the call,
which is why :func:`resolve_target` hands the sender the addresses to connect to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import unquote

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Metadata services that hand out instance credentials. 169.254.169.254 is also link-local,
# 100.100.100.200 (Alibaba) also shared address space; named here so a refusal says why.
CLOUD_METADATA = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OCI, DigitalOcean, ...
    ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
}
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT, RFC 6598
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # reaches the IPv4 address in its last 32 bits
DEFAULT_PORTS = {"http": 80, "https": 443}


class UrlRefused(ValueError):
    """A webhook URL the gateway will not call; the message says why, for the tenant."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches through a translation: mapped, 6to4, NAT64."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def _reason(ip: IPAddress) -> str | None:
    if ip in CLOUD_METADATA:
        return "a cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            reason = _reason(inner)
            return f"{reason} (as {inner} inside IPv6)" if reason else None
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip in SHARED_ADDRESS_SPACE:
        return "in the shared address space (100.64.0.0/10)"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local):
        return "a private address"
    if not ip.is_global:  # documentation, benchmarking, 6to4 relay... ranges: nobody's receiver
        return "not a public address"
    return None


def forbidden_reason(ip: str) -> str | None:
    """Why the gateway must not connect to ``ip`` (None: it is a public address)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "not an IP address"
    return _reason(address)


def _parse(url: str) -> tuple[str, str, int, IPAddress | None]:
    """Scheme, host (IDNA-encoded, as DNS, SNI and the Host header see it), port and the
    host's IP address when it is a literal."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise UrlRefused(f"not a valid URL: {exc}") from exc
    if parsed.scheme not in DEFAULT_PORTS:
        raise UrlRefused("webhook URLs must be http(s)")
    if parsed.userinfo:
        raise UrlRefused("webhook URLs must not carry credentials (user:password@)")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise UrlRefused("the URL has no host")
    port = parsed.port or DEFAULT_PORTS[parsed.scheme]
    if not 0 < port < 65536:
        raise UrlRefused(f"port {port} is out of range")
    try:
        literal: IPAddress | None = ipaddress.ip_address(unquote(host))
    except ValueError:
        literal = None
    return parsed.scheme, host, port, literal


async def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the resolver's order, without repeats."""
    loop = asyncio.get_running_loop()
    try:  # the loop runs getaddrinfo in its thread pool, so a slow resolver blocks no one
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlRefused(f"the host {host!r} does not resolve") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise UrlRefused(f"the host {host!r} does not resolve")
    return addresses


async def resolve_target(url: str, *, allow_private: bool) -> tuple[str, int, list[str]]:
    """Host, port and the vetted addresses to connect to; the sender connects to these and
    resolves nothing itself, so a name cannot be re-pointed between this check and the call."""
    _, host, port, literal = _parse(url)
    addresses = [str(literal)] if literal is not None else await _resolve(host, port)
    if not allow_private:
        for address in addresses:
            reason = forbidden_reason(address)
            if reason is not None:
                shown = address if literal is not None else f"{host!r} resolves to {address}, which"
                raise UrlRefused(f"{shown} is {reason}; webhooks may only call public addresses")
    return host, port, addresses


async def check_url(url: str, *, allow_http: bool, allow_private: bool) -> None:
    """Refuse, with a reason for the tenant, a webhook URL the gateway must not call."""
    scheme, _, _, _ = _parse(url)
    if scheme != "https" and not allow_http:
        raise UrlRefused("webhook URLs must use https")
    await resolve_target(url, allow_private=allow_private)
