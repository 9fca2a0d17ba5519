"""Per-request context on the HTTP edge: the request ids, metrics, and a last-resort 500.

Two ids name an HTTP request: `request_id`, the router's own (unique, used for
job ids on the bus), and `client_request_id`, the client's `X-Request-Id` when
it sent a short, log-safe one. Both appear in every log line about the
request; the response's `X-Request-Id` echoes the client's id, or gives ours.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Callable

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.core.errors import error_response
from router.edge.http_metrics import HttpMetrics

logger = logging.getLogger(__name__)

# A client-chosen request id is used only if it is short and harmless in logs and headers.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# nginx's "client closed request": logged and counted, never seen by the gone client.
STATUS_CLIENT_CLOSED = 499


def request_id(request: Request) -> str:
    """The router's id for this HTTP request."""
    return request.state.request_id


def client_request_id(request: Request) -> str | None:
    """The client's X-Request-Id, when it sent a usable one."""
    return request.state.client_request_id


def log_tag(request: Request) -> str:
    """How log lines name this request: the router's id, then the client's."""
    return scope_log_tag(request.scope)


def scope_log_tag(scope: Scope) -> str:
    """`log_tag` for ASGI middleware, which has the scope and no Request."""
    state = scope.get("state", {})
    rid, client = state.get("request_id", "-"), state.get("client_request_id")
    return rid if client is None else f"{rid} client={client}"


class RequestContextMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would break disconnect detection).

    Gives each request its ids, returns the id as a header, records metrics by
    route template and status, and turns any unexpected exception into a logged
    500 that names the request id, so one bad request never takes the server down.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, routes: Callable[[], list[Any]]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        client_rid = _incoming_request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"], state["client_request_id"] = rid, client_rid
        tag = rid if client_rid is None else f"{rid} client={client_rid}"
        endpoint = self._endpoint(scope)
        method = scope["method"]
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-Id", client_rid or rid)
            await send(message)

        start = time.perf_counter()
        self.metrics.in_flight.labels(endpoint).inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("[%s] %s %s: unhandled error", tag, method, scope.get("path"))
            if not response_started:
                response = error_response(
                    500, f"internal server error; quote request id {client_rid or rid} when reporting it", "server_error")
                await response(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.labels(endpoint).dec()
            if status == STATUS_CLIENT_CLOSED:
                self.metrics.client_disconnects.labels(endpoint).inc()
            self.metrics.observe(endpoint, method, status, time.perf_counter() - start)

    def _endpoint(self, scope: Scope) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", "other")
        return "other"


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1").strip()
            return text if _SANE_REQUEST_ID.match(text) else None
    return None
