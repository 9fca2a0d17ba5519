"""Limits on HTTP connections, below the ASGI app: a header deadline, a header size cap, a cap on
open connections, and a clean close after a response sent before the body was read.

uvicorn alone holds a connection that sends nothing, or trickles its request line and headers a
byte at a time, for ever (its keep-alive timer only runs between requests); httptools (llhttp)
accepts headers of any size; and `limit_concurrency` counts open connections and running tasks
together (`>=`, so one short of the number given), decides per request rather than per
connection (a flood of new connections also refuses the established ones), and answers a
plain-text 503. `GuardedHttpProtocol`, a small subclass of uvicorn's httptools protocol, does
instead:

- **header deadline**: from the moment a connection opens, or its previous response ends, the
  next request's headers must be complete within `header_timeout_s`; else `408` (our JSON error
  shape) and the connection is closed, or, when not one byte of a request came, it is closed
  quietly (a 408 could be taken for the answer to the request a client sends next). An idle
  keep-alive connection is normally closed by uvicorn's own keep-alive timer first (5 s).
- **header size**: more than `max_header_bytes` of request line and headers is a `431` and a close.
- **connection cap**: a connection opened while `max_connections` others are open answers its
  first request with a `503` (`Retry-After: 1`) and closes, except `GET /health` (a liveness
  probe must not kill a busy router); connections opened before it are not affected.
- **bodies not read**: a response sent before the request body was all received (401, 413, 408...)
  ends the connection: the server half-closes, discards what still arrives for `linger_s` (so
  the client reads the response instead of a reset), then closes.
- **truncated bodies**: a client that closes its side before the body it announced is complete
  gets a 400 saying so (`router.edge.http_body.BODY_TRUNCATED`), not a short body read as whole.

The body deadline (the whole body within N s of the headers) is an ASGI middleware:
`router.edge.http_body.BodyDeadlineMiddleware`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
from dataclasses import dataclass
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge
from starlette.types import Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from common.stage_config import RouterSettings
from router.core.errors import error_body, error_response
from router.edge.http_body import BODY_TRUNCATED

logger = logging.getLogger(__name__)

CLOSE_REASONS = ("header_timeout", "header_too_large", "body_timeout", "over_capacity", "malformed")
_FD_RESERVE = 256  # descriptors besides HTTP connections: the bus, logs, spooled uploads, the loop


@dataclass(frozen=True)
class ConnectionLimits:
    """What `GuardedHttpProtocol` enforces (from the stage config's `router:` section)."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 32 * 1024
    max_connections: int = 1024
    linger_s: float = 2.0

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> "ConnectionLimits":
        return cls(header_timeout_s=settings.http_header_timeout_s, max_header_bytes=settings.http_max_header_bytes,
                   max_connections=settings.http_max_connections)


class HttpLimitMetrics:
    """Open connections and the ones closed by a limit, on the router's registry."""

    def __init__(self, registry: CollectorRegistry):
        self.open = Gauge("glm_router_http_connections_open", "HTTP connections open now", registry=registry)
        self.closed = Counter(
            "glm_router_http_connections_closed", "HTTP connections ended by a limit, by reason (header_timeout: "
            "headers not complete in time, 408; header_too_large: 431; body_timeout: body not complete in time, "
            "408; over_capacity: opened beyond http_max_connections, 503; malformed: not valid HTTP/1.1, 400)",
            ["reason"], registry=registry)
        for reason in CLOSE_REASONS:
            self.closed.labels(reason)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of this module (see its docstring)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, limits: ConnectionLimits,
                 metrics: HttpLimitMetrics):
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.metrics = metrics
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # request line and headers parsed so far (the exact count)
        self._partial_bytes = 0  # bytes read while the headers are still incomplete (bounds memory)
        self._request_begun = False  # a byte of the awaited request has arrived
        self._over_capacity = False
        self._lingering = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._counted = False

    # -- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.metrics.open.inc()
        self._counted = True
        # This connection is in the set already: over capacity when the others fill it.
        self._over_capacity = len(self.connections) > self.limits.max_connections
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._counted:
            self.metrics.open.dec()
            self._counted = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a body nobody will read
        awaiting_headers = self._header_timer is not None
        super().data_received(data)
        if awaiting_headers and self._header_timer is not None and not self.transport.is_closing():
            # Headers still incomplete after this chunk: the parser holds them, so stop before they
            # grow without bound (a chunk that also ends the previous body counts whole).
            self._partial_bytes += len(data)
            if self._partial_bytes > self.limits.max_header_bytes:
                self._refuse(431, self._too_large_message(), "header_too_large")

    def eof_received(self) -> bool | None:
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not cycle.response_complete and not self._lingering:
            # The client closed its side with the body incomplete: let the body reader say so (400);
            # our side stays open for that answer, then closes.
            cycle.scope.setdefault("state", {})[BODY_TRUNCATED] = True
            cycle.more_body = False
            cycle.keep_alive = False
            cycle.message_event.set()
            return True
        return super().eof_received()

    def send_400_response(self, msg: str) -> None:
        # httptools refused the bytes (request line, a header, chunk sizes, Content-Length with
        # Transfer-Encoding): uvicorn answers plain text; ours is the JSON error shape, and counted.
        self._refuse(400, "malformed HTTP request: the request line, a header, the Content-Length or the "
                          "chunked encoding is not valid HTTP/1.1", "malformed")

    # -- parser callbacks -----------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._header_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a pipelined request: its deadline starts with its first byte
            self._start_header_timer()
        self._request_begun = True

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        if self._header_bytes > self.limits.max_header_bytes:
            # Complete but too large (they came in one read): answered by the cycle, then closed.
            self.app = functools.partial(_refusal_app, 431, self._too_large_message(), "invalid_request_error", {})
            self.metrics.closed.labels("header_too_large").inc()
        elif self._over_capacity and not (self.parser.get_method() == b"GET" and self.url.split(b"?")[0] == b"/health"):
            message = f"the server has too many open connections (at most {self.limits.max_connections}); retry shortly"
            self.app = functools.partial(_refusal_app, 503, message, "service_unavailable", {"Retry-After": "1"})
            self.metrics.closed.labels("over_capacity").inc()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        body_pending = self.cycle is not None and self.cycle.more_body and not self.pipeline
        next_is_parsed = bool(self.pipeline)
        if body_pending and not self.transport.is_closing():
            # Answered before the body was read (401, 413, 408, 404...): nothing more on this connection.
            self.server_state.total_requests += 1
            self._unset_keepalive_if_required()
            self._linger()
            return
        super().on_response_complete()
        if not next_is_parsed and not self.transport.is_closing():
            self._start_header_timer()

    # -- timers and refusals --------------------------------------------------------------

    def _too_large_message(self) -> str:
        return f"request headers exceed {self.limits.max_header_bytes} bytes"

    def _start_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_bytes = self._partial_bytes = 0
        self._request_begun = False
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._lingering:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # An earlier request's response is being written: no 408 in its middle; close after it.
            self.cycle.keep_alive = False
            self.metrics.closed.labels("header_timeout").inc()
            return
        if not self._request_begun:
            # Nothing of a request arrived: close quietly, as an idle keep-alive connection is closed.
            # A 408 here could be read by a client as the answer to the request it sends next.
            self.metrics.closed.labels("header_timeout").inc()
            self.transport.close()
            return
        self._refuse(408, f"request headers not received in time: they must be complete within "
                          f"{self.limits.header_timeout_s:g}s", "header_timeout")

    def _refuse(self, status: int, message: str, reason: str) -> None:
        """Answer `status` with `message` outside any request cycle, then close."""
        self.metrics.closed.labels(reason).inc()
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self.transport.close()  # a response is on the wire: no second one in its middle
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The app may be waiting for this request's body: it will not come.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        peer = "%s:%d" % self.client if self.client else "unknown peer"
        logger.info("connection from %s -> %d: %s", peer, status, message)
        body = json.dumps(error_body(status, message, "invalid_request_error"), separators=(",", ":")).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
                 b"\r\nconnection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self._linger()

    def _linger(self) -> None:
        """Half-close after the response; discard input for `linger_s` (closing with unread input would
        reset the connection, and the client could lose the response), then close."""
        self._lingering = True
        self._cancel_header_timer()
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._close_timer = self.loop.call_later(self.limits.linger_s, self.transport.close)


async def _refusal_app(status: int, message: str, error_type: str, headers: dict[str, str], scope: Scope,
                       receive: Receive, send: Send) -> None:
    """The ASGI app of a request refused by the protocol: the error, then the connection closes."""
    response = error_response(status, message, error_type, headers={**headers, "Connection": "close"})
    await response(scope, receive, send)


def protocol_factory(limits: ConnectionLimits, metrics: HttpLimitMetrics) -> Callable[..., GuardedHttpProtocol]:
    """What `uvicorn.Config(http=...)` takes: it builds one protocol per connection."""
    return functools.partial(GuardedHttpProtocol, limits=limits, metrics=metrics)


def ensure_open_files(max_connections: int) -> int:
    """Raise this process's open-files limit so `max_connections` fit (with room for the connections
    over the cap, which hold a descriptor until refused); return how many connections fit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max_connections + _FD_RESERVE
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            logger.info("open files limit raised from %d to %d for up to %d HTTP connections", soft, new, max_connections)
            soft = new
    fits = max(soft - _FD_RESERVE, 1)
    if fits < max_connections:
        logger.warning("the open files limit (%d, hard %d) leaves room for %d HTTP connections, not "
                       "http_max_connections=%d: capping at %d (raise `ulimit -n`)", soft, hard, fits,
                       max_connections, fits)
        return fits
    return max_connections
