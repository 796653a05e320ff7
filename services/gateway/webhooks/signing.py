"""Standard Webhooks signatures (https://www.standardwebhooks.com), made by its own package.

Receivers verify with ``standardwebhooks.Webhook(secret).verify(body, headers)`` or any
library of the spec; signing with that same package keeps the two from drifting apart. One
header carries a signature per live secret, so a receiver still holding the old secret keeps
verifying while a rotation overlaps.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from secrets import token_bytes

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A signing secret in the spec's format: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(32)).decode("ascii")


def _utc(timestamp: datetime | int) -> datetime:
    # Webhook.sign() replaces the tzinfo with UTC rather than converting, so an aware
    # non-UTC time (or a naive local one) would be signed as a different second.
    if isinstance(timestamp, datetime):
        return timestamp.astimezone(UTC) if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
    return datetime.fromtimestamp(timestamp, UTC)


def signature_header(secrets: list[str], msg_id: str, timestamp: datetime | int,
                     body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64>`` per secret, space-separated.

    A naive ``timestamp`` is taken as UTC. ``body`` must be UTF-8 (it is our JSON), as the
    spec signs text.
    """
    if not secrets:
        raise ValueError("at least one secret is needed to sign")
    at, text = _utc(timestamp), body.decode("utf-8")
    return " ".join(Webhook(secret).sign(msg_id, at, text) for secret in secrets)


def webhook_headers(msg_id: str, timestamp: datetime | int, signature: str) -> dict[str, str]:
    """The request headers of one delivery; ``webhook-id`` is stable across its retries so
    receivers can drop duplicates."""
    seconds = int(_utc(timestamp).timestamp())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(seconds),
        "webhook-signature": signature,
        "content-type": "application/json",
    }
