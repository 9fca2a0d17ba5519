"""Exception handlers: every HTTP failure in OpenAI's error shape (`router.core.errors.error_response`)."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from router.core.errors import ServiceError, error_response
from router.edge.request_context import STATUS_CLIENT_CLOSED, log_tag

logger = logging.getLogger(__name__)


async def _service_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    level = logging.WARNING if exc.status_code >= 500 else logging.INFO
    logger.log(level, "[%s] %s %s -> %d: %s", log_tag(request), request.method, request.url.path,
               exc.status_code, exc.message)
    headers = None
    if exc.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return error_response(exc.status_code, exc.message, exc.error_type, headers, code=exc.code)


async def _http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message, error_type = f"no such endpoint: {request.method} {request.url.path}", "not_found_error"
    elif exc.status_code == 405:
        message, error_type = f"method {request.method} is not allowed on {request.url.path}", "invalid_request_error"
    else:
        message = str(exc.detail)
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, message, error_type, dict(exc.headers or {}))


async def _request_validation_handler(request: Request, exc: Exception) -> Response:
    # Only reachable through parameters FastAPI parses itself (none of the bodies).
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}")
    return error_response(400, "; ".join(parts) or "invalid request", "invalid_request_error")


async def _client_disconnect_handler(request: Request, exc: Exception) -> Response:
    # The client left while its body was being read: nobody to answer; logged and counted as 499.
    logger.info("[%s] %s %s: the client disconnected before sending its whole body", log_tag(request),
                request.method, request.url.path)
    return Response(status_code=STATUS_CLIENT_CLOSED)


def install_error_handlers(app: FastAPI) -> None:
    """Route our ServiceErrors and Starlette's own errors through `error_response`."""
    app.add_exception_handler(ServiceError, _service_error_handler)
    app.add_exception_handler(ClientDisconnect, _client_disconnect_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(RequestValidationError, _request_validation_handler)
