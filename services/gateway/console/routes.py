"""The web console: static files the gateway serves at ``/``, a client of the public API only.

No build step: plain HTML, CSS and JavaScript modules, so a clean clone serves it as it is.
The browser keeps the API key (``localStorage``) and sends it as a Bearer header like any
client; the gateway knows nothing of the console beyond serving these files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def console() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache"})


def install(app: Any) -> None:
    app.include_router(router)
    app.mount("/console", StaticFiles(directory=STATIC), name="console")
