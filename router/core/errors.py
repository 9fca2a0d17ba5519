"""Errors the router turns into HTTP responses: each carries its status and a message for the user."""

from __future__ import annotations

from starlette.responses import JSONResponse


def error_body(status: int, message: str, error_type: str, code: int | str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}; `code` defaults to the status."""
    return {"error": {"message": message, "type": error_type, "param": None, "code": status if code is None else code}}


def error_response(status: int, message: str, error_type: str, headers: dict[str, str] | None = None,
                   code: int | str | None = None) -> JSONResponse:
    """The OpenAI-style error response every failure uses (`error_body`)."""
    return JSONResponse(error_body(status, message, error_type, code), status_code=status, headers=headers)


class ServiceError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = None  # OpenAI's error code, where it has one; else the status

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequest(ServiceError):
    """The client sent something we cannot serve; the message says what to fix."""

    status_code = 400
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status_code = 413


class UnsupportedMediaType(InvalidRequest):
    status_code = 415


class RequestTimeout(InvalidRequest):
    """The client did not send its request (headers or body) within the deadline."""

    status_code = 408


class NotFound(InvalidRequest):
    status_code = 404
    error_type = "not_found_error"


class Overloaded(ServiceError):
    """Admission control: the stage queue is full. Sent with Retry-After."""

    status_code = 429
    error_type = "rate_limit_error"


class TenantOverLimit(Overloaded):
    """The API key already has as many images in flight as its cap allows (OpenAI's rate-limit shape)."""

    error_type = "requests"
    code = "rate_limit_exceeded"


class NoLiveWorkers(ServiceError):
    """No live worker of a stage; names the stage."""

    status_code = 503
    error_type = "service_unavailable"


class DeadlineExceeded(ServiceError):
    status_code = 504
    error_type = "timeout_error"


class StageFailed(ServiceError):
    """A stage failed for a reason retries did not fix; carries the worker's cause."""

    status_code = 502
    error_type = "stage_error"
