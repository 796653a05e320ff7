"""Signed downloads for the local-directory storage backend (S3 serves its own URLs)."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter
from fastapi.responses import FileResponse

from services.gateway.deps import StateDep
from services.gateway.files.stores import LocalStore
from shared.errors import NotFound, Unauthorized

router = APIRouter(tags=["files"], include_in_schema=False)


@router.get("/v1/files/{key:path}")
async def download(key: str, expires: int, signature: str, state: StateDep) -> FileResponse:
    store = state.store
    if not isinstance(store, LocalStore):
        raise NotFound("downloads are served by the object store", code="not_found")
    if not store.verify(key, expires, signature):
        raise Unauthorized("download link is invalid or expired", code="invalid_signature")
    path = store.path_for(key)
    if not path.is_file():
        raise NotFound(f"object {key!r} not found")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type)
