"""RFC 9457 problem+json for every error the gateway returns, one envelope for all."""

from __future__ import annotations

import email.message
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from services.gateway.bodylimit import BodyTooLarge
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
        (415, "The body is not in the media type the operation takes (JSON here)"),
        (422, "Invalid field values"),
        (503, "A backing service is unavailable"),
    )
}


class ErrorShape(Protocol):
    """Renders an error in a foreign API's shape (the compatibility adapters' clients parse
    their own error bodies, not problem+json)."""

    def __call__(self, request: Request, *, status: int, code: str, title: str, detail: str,
                 errors: list[dict[str, Any]] | None,
                 headers: dict[str, str] | None) -> JSONResponse: ...


# (path prefix, shape): the first match renders every error of a route under the prefix
ERROR_SHAPES: list[tuple[str, ErrorShape]] = []


def problem_response(
    request: Request, *, status: int, code: str, title: str, detail: str,
    errors: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None,
) -> JSONResponse:
    for prefix, shape in ERROR_SHAPES:
        if request.url.path.startswith(prefix):
            return shape(request, status=status, code=code, title=title, detail=detail,
                         errors=errors, headers=headers)
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


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


def _takes_json(request: Request) -> bool:
    """Whether the matched operation reads a JSON body (not none, not a multipart form)."""
    body_field = getattr(request.scope.get("route"), "body_field", None)
    return body_field is not None and not isinstance(body_field.field_info, params.Form)


def _unsupported_media_type(request: Request, raw: Sequence[Any]) -> bool:
    """A JSON operation sent text or a form: FastAPI hands the raw bytes to the model, whose
    "not an object" would blame the body when the fault is its media type."""
    if not _takes_json(request):
        return False  # no body, or a multipart/form operation: its own errors are the answer
    content_type = request.headers.get("content-type")
    if _is_json(content_type):
        return False
    body_missing = any(err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",)
                       for err in raw)
    return content_type is not None or not body_missing


def _body_not_json(error: Any) -> bool:
    """The body itself failed to parse (FastAPI's ``("body", <position>)``). A JSON-valued
    form field that is not JSON (a subject's ``overrides``) is that field's error, located
    ``("body", "overrides")``: calling it a malformed body would blame the wrong thing."""
    loc = tuple(error.get("loc", ()))
    return error.get("type") == "json_invalid" and not any(isinstance(p, str) for p in loc[1:])


def _allowed_methods(app: Any, scope: Scope) -> list[str]:
    """Every method some route serves on this path: Starlette's 405 names only the first
    route that matched the path (``GET /v1/jobs/{id}`` hides ``DELETE``'s sibling routes)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        probe: Scope = {"type": "http", "method": method, "path": scope["path"],
                        "root_path": scope.get("root_path", ""), "headers": [],
                        "query_string": b""}
        if any(route.matches(probe)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    said = f"the body is {exc.declared} bytes" if exc.declared else "the body is larger"
    message = f"{said}; the limit is {exc.limit} (LOOMIS_GATEWAY__MAX_BODY_BYTES)"
    return problem_response(
        request, status=413, code="payload_too_large", title="Payload too large",
        detail=message, errors=[{"field": "body", "message": message,
                                 "type": "payload_too_large"}],
        headers={"Connection": "close"})


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
        if _unsupported_media_type(request, raw):
            sent = request.headers.get("content-type")
            return problem_response(
                request, status=415, code="unsupported_media_type",
                title="Unsupported media type",
                detail="This operation takes an application/json body, "
                       + (f"not {sent}." if sent else "and the request names no Content-Type."),
                errors=[{"field": "header.Content-Type",
                         "message": "send the body as JSON with Content-Type: application/json",
                         "type": "unsupported_media_type"}],
                headers={f"Accept-{request.method.title()}": "application/json"},
            )
        if any(_body_not_json(err) for err in raw):
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

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _body_too_large(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__
        if isinstance(cause, BodyTooLarge):  # FastAPI wraps what its body read raised
            return _body_too_large(request, cause)
        if exc.status_code == 400 and isinstance(cause, ValueError | RecursionError) \
                and _takes_json(request):
            # What json.loads raises besides JSONDecodeError: bytes that are not UTF-8,
            # nesting deeper than the parser recurses. Malformed JSON all the same.
            reason = ("the body is not UTF-8 text" if isinstance(cause, UnicodeDecodeError)
                      else "the JSON is nested too deeply" if isinstance(cause, RecursionError)
                      else "the body is not valid JSON")
            return problem_response(
                request, status=400, code="malformed_json", title="Malformed JSON",
                detail=f"The request body is not valid JSON: {reason}.",
                errors=[{"field": "body", "message": reason, "type": "json_invalid"}],
            )
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405 and (allowed := _allowed_methods(request.app, request.scope)):
            headers["Allow"] = ", ".join(allowed)
        return problem_response(
            request, status=exc.status_code, code=code, title=str(exc.detail),
            detail=str(exc.detail), headers=headers or None,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return problem_response(
            request, status=500, code="internal_error", title="Internal error",
            detail="An unexpected error occurred; it has been logged.",
        )
