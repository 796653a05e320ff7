"""RFC 9457 problem+json for every error the gateway returns, one envelope for all."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import LoomisError

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class FieldError(BaseModel):
    field: str = Field(examples=["width"], description="Dotted path of the bad field in the request, e.g. "
                       "`controls.0.image`.")
    message: str = Field(examples=["Input should be a multiple of 8"], description="What is wrong with it.")
    type: str | None = Field(default=None, description="The kind of check that failed, e.g. `multiple_of`.")


class Problem(BaseModel):
    """The error body of every 4xx/5xx (RFC 9457), plus a stable ``code`` and field errors."""

    type: str = Field(examples=["urn:loomis:problem:validation_error"], description="URI naming the "
                      "problem type: `urn:loomis:problem:<code>`.")
    title: str = Field(examples=["Invalid request"], description="Short summary of the problem type.")
    status: int = Field(examples=[422], description="The HTTP status code.")
    detail: str = Field(examples=["Invalid value for: width"], description="What went wrong with this "
                        "request.")
    instance: str | None = Field(default=None, examples=["/v1/generations"], description="The request path.")
    code: str = Field(examples=["validation_error"], description="Stable machine-readable code to branch on.")
    errors: list[FieldError] | None = Field(default=None, description="For invalid input: one entry per "
                                            "bad field.")


PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": description}
    for status, description in (
        (400, "Malformed request"),
        (401, "Missing or invalid API key"),
        (404, "Not found (or another tenant's)"),
        (409, "Conflict"),
        (413, "An uploaded image or file is too large"),
        (422, "Invalid field values"),
        (503, "A backing service is unavailable"),
    )
}


def problem_response(
    request: Request, *, status: int, code: str, title: str, detail: str,
    errors: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"urn:loomis:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "code": code,
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        where, rest = parts[0], parts[1:]
        return ".".join(rest) if (rest and where == "body") else ".".join(parts)
    return ".".join(parts) or "body"


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoomisError)
    async def _loomis(request: Request, exc: LoomisError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status >= 500:
            logger.warning("request failed: %s (%s)", exc.detail, exc.code)
        return problem_response(
            request, status=exc.status, code=exc.code, title=exc.title, detail=exc.detail,
            errors=exc.extra.get("errors"), headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        raw = exc.errors()
        if any(err.get("type") == "json_invalid" for err in raw):
            return problem_response(
                request, status=400, code="malformed_json", title="Malformed JSON",
                detail="The request body is not valid JSON.",
                errors=[{"field": "body", "message": str(raw[0].get("msg")), "type": "json_invalid"}],
            )
        errors = [
            {"field": _field_name(tuple(err.get("loc", ()))), "message": str(err.get("msg")),
             "type": err.get("type")}
            for err in raw
        ]
        fields = ", ".join(dict.fromkeys(e["field"] for e in errors))
        return problem_response(
            request, status=422, code="validation_error", title="Invalid request",
            detail=f"Invalid value for: {fields}", errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return problem_response(
            request, status=exc.status_code, code=code, title=str(exc.detail),
            detail=str(exc.detail), headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return problem_response(
            request, status=500, code="internal_error", title="Internal error",
            detail="An unexpected error occurred; it has been logged.",
        )
