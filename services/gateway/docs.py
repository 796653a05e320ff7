"""Swagger UI and ReDoc served from the installation, never from a CDN.

Self-hosted and air-gapped installs are the point of Loomis, and FastAPI's default pages load
their JavaScript and CSS from jsdelivr, so offline they are blank. The ``fastapi-offline``
wheel ships the Swagger UI and ReDoc bundles; we serve its ``static`` folder ourselves and
keep our own routes, so the pages use our title, bearer auth and root path.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from services.gateway.problems import problem_response

logger = logging.getLogger(__name__)

ASSETS_URL = "/docs/assets"
ASSETS_PACKAGE = "fastapi_offline"

SWAGGER_UI_PARAMETERS: dict[str, Any] = {
    # The validator badge is an image fetched from validator.swagger.io: off, as offline.
    "validatorUrl": None,
    "persistAuthorization": True,
    "displayRequestDuration": True,
}


def assets_dir() -> Path | None:
    """The installed Swagger UI/ReDoc bundles, or None when the package is missing."""
    try:
        folder = Path(str(importlib.resources.files(ASSETS_PACKAGE).joinpath("static")))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def install_docs(app: FastAPI) -> None:
    """``/docs`` and ``/redoc`` whose every asset is served by the gateway itself."""
    folder = assets_dir()
    if folder is None:
        logger.warning("%s is not installed: /docs and /redoc answer 503", ASSETS_PACKAGE)
    else:
        app.mount(ASSETS_URL, StaticFiles(directory=folder), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    def unavailable(request: Request) -> Response:
        return problem_response(
            request, status=503, code="docs_unavailable", title="API docs unavailable",
            detail=f"the {ASSETS_PACKAGE} package that ships the docs pages is not installed; "
                   f"the OpenAPI document is at {openapi_url}",
        )

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> Response:
        if folder is None:
            return unavailable(request)
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} API",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> Response:
        if folder is None:
            return unavailable(request)
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} API",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png", with_google_fonts=False,
        )
