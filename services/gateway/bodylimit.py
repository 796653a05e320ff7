"""A cap on the bodies the gateway reads whole.

A JSON (or form-encoded) body is read into memory before it is parsed, so without a cap one
request of a few GB takes the gateway down. Multipart uploads are streamed to disk by
:mod:`services.gateway.multipart` under their own per-route limits and are left alone here.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    """Raised from ``receive`` so the route's body read fails; the HTTPException FastAPI wraps
    it in is answered as a 413 naming ``body`` (services/gateway/problems.py)."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        self.limit = limit
        self.declared = declared
        super().__init__(f"the body is over {limit} bytes")


class BodyLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").lower()
        if content_type.startswith(b"multipart/"):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared: int | None = None
        try:
            declared = int(headers.get(b"content-length", b""))
        except ValueError:
            declared = None
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            if declared is not None and declared > limit:
                raise BodyTooLarge(limit, declared)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)
