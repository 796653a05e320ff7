"""Deleted LoRAs leave every worker's cache: the record the gateway writes and workers follow.

One stream is both the broadcast and the durable record: a live worker blocks on it, and a
worker that was down reads it from its start when it starts, so no eviction is missed for
lack of a listener (pub/sub would lose those). Capped by count, never by a TTL, which would
drop the entries a long-stopped worker still has to apply; an entry is ~100 bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from redis.asyncio import Redis

LORA_EVICTIONS_STREAM = "loomis:lora-evictions"
LORA_EVICTIONS_MAXLEN = 100_000


def eviction_digest(sha256: str) -> str:
    """What an eviction names: a hash of the file's hash, never the LoRA's id or its hash.

    Forgetting a person must leave nothing that names their LoRA, the eviction record
    included; a worker holds the hashes of the files it cached and recognises its own."""
    return hashlib.sha256(f"loomis-lora-eviction:{sha256}".encode()).hexdigest()


@dataclass(frozen=True)
class LoraEviction:
    digest: str  # eviction_digest of the file's SHA-256


async def record_lora_eviction(redis: Redis, *, sha256: str) -> None:
    """After the row and the stored file are gone, so no worker can fetch the file again."""
    await redis.xadd(LORA_EVICTIONS_STREAM, {"digest": eviction_digest(sha256)},
                     maxlen=LORA_EVICTIONS_MAXLEN, approximate=True)


async def read_lora_evictions(
    redis: Redis, *, after: str, block_ms: int | None = None,
) -> tuple[str, list[LoraEviction]]:
    """Evictions recorded after stream id ``after`` ("0": all of them) and the id to read from
    next time."""
    reply = await redis.xread({LORA_EVICTIONS_STREAM: after}, count=1000, block=block_ms)
    last, out = after, []
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            norm = {(k.decode() if isinstance(k, bytes) else k):
                    (v.decode() if isinstance(v, bytes) else v) for k, v in fields.items()}
            if "digest" in norm:
                out.append(LoraEviction(digest=norm["digest"]))
            elif "sha256" in norm:  # recorded before evictions were blinded
                out.append(LoraEviction(digest=eviction_digest(norm["sha256"])))
    return last, out
