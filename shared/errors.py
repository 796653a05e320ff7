"""One error family for every service: an HTTP status, a stable machine code, a human detail.

The gateway renders these as RFC 9457 problem+json; workers put ``code`` and ``detail`` into
a job's ``failed`` event so clients see the same vocabulary either way.
"""

from __future__ import annotations

from typing import Any


class LoomisError(Exception):
    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(self, detail: str, *, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.extra = extra


class BadRequest(LoomisError):
    status, code, title = 400, "bad_request", "Bad request"


class Unauthorized(LoomisError):
    status, code, title = 401, "unauthorized", "Unauthorized"


class NotFound(LoomisError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(LoomisError):
    status, code, title = 409, "conflict", "Conflict"


class ValidationFailed(LoomisError):
    """Input that parsed but is not acceptable; ``errors`` names each offending field."""

    status, code, title = 422, "validation_error", "Invalid request"

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        fields = ", ".join(str(e["field"]) for e in errors)
        super().__init__(f"Invalid value for: {fields}", errors=errors)
        self.errors = errors


class ServiceUnavailable(LoomisError):
    status, code, title = 503, "service_unavailable", "Service unavailable"


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"


class JobFailure(LoomisError):
    """Raised inside a worker for a permanent failure; ends the job in ``failed`` with ``code``."""

    status, code, title = 500, "job_failed", "Job failed"


class ModelUnavailable(JobFailure):
    code = "model_unavailable"


class InvalidJobSpec(JobFailure):
    """The worker refused what the job asks for: a rule only the worker can check (its
    device, the model's modules, a saved state) or a spec queued before the gateway checked it."""

    code = "invalid_spec"


class OptimizerUnavailable(JobFailure):
    """The training's optimizer needs a package this worker does not have."""

    code = "optimizer_unavailable"


class JobCanceled(Exception):
    """Raised between steps when the client asked to cancel; not an error to report."""
