"""Writing a job's outputs: every object goes to a key derived from the job id and comes back
as an :class:`ArtifactRef` with its size and hash, so a re-run overwrites rather than adds and
the gateway can check what it lists.
"""

from __future__ import annotations

import hashlib

from shared.specs import ArtifactRef
from shared.storage import ObjectStore


async def put_artifact(store: ObjectStore, key: str, data: bytes, content_type: str) -> ArtifactRef:
    """Store ``data`` and describe it; PNGs are images, anything else a manifest."""
    await store.put(key, data, content_type=content_type)
    kind = {"image/png": "image"}.get(content_type, "manifest")
    return ArtifactRef(key=key, kind=kind, content_type=content_type,
                       size=len(data), sha256=hashlib.sha256(data).hexdigest())
