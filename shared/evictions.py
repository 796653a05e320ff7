"""Deleted LoRAs leave every worker's cache: the record the gateway writes and workers follow.

One stream is both the broadcast and the durable record: a live worker blocks on it, and a
worker that was down reads it from its start when it starts, so no eviction is missed for
lack of a listener (pub/sub would lose those). Capped by count, never by a TTL, which would
drop the entries a long-stopped worker still has to apply; an entry is ~100 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

LORA_EVICTIONS_STREAM = "loomis:lora-evictions"
LORA_EVICTIONS_MAXLEN = 100_000


@dataclass(frozen=True)
class LoraEviction:
    lora_id: str
    sha256: str  # workers cache files and adapters by content hash, not by id


async def record_lora_eviction(redis: Redis, *, lora_id: str, sha256: str) -> None:
    """After the row and the stored file are gone, so no worker can fetch the file again."""
    await redis.xadd(LORA_EVICTIONS_STREAM, {"lora_id": lora_id, "sha256": sha256},
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
            out.append(LoraEviction(lora_id=norm["lora_id"], sha256=norm["sha256"]))
    return last, out
