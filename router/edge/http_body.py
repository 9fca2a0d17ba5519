"""Reading request bodies by hand, with limits applied while reading.

FastAPI's body parameters are not used so that a body over the limit is a 413
before it is all in memory, a wrong content type is a 415, broken or hostile
JSON says so (`router.edge.safe_json`), a body that does not arrive in time is a 408
(`BodyDeadlineMiddleware`), and validation errors are one readable 400 instead
of a 422 dump.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Callable

from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.stage_config import Limits
from router.core.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from router.edge.safe_json import parse_json_body

_MAX_FORM_FIELDS = 64
_MAX_PART_HEADER_BYTES = 8 * 1024  # all the headers of one multipart part (a browser sends ~150 bytes)
_MAX_BOUNDARY_CHARS = 70  # RFC 2046
_BOUNDARY = re.compile(rb"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")  # RFC 2046 bchars
_PARSE_OFF_LOOP_BYTES = 1 << 20  # bigger JSON bodies are parsed in a thread: ~5 ms per MB
# Set in the request's scope["state"] by the HTTP protocol (router/edge/http_limits.py) when the client
# closed its side before the body it announced was complete: the body is then refused, not read short.
BODY_TRUNCATED = "body_truncated"


def max_body_bytes(limits: Limits, base64_images: bool) -> int:
    """Largest body accepted: room for every condition image plus the rest of the request.

    JSON bodies carry images as base64, 4/3 of their size.
    """
    image_bytes = limits.max_upload_bytes * 4 // 3 if base64_images else limits.max_upload_bytes
    return image_bytes * limits.max_condition_images + limits.max_upload_bytes


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _content_type_params(request: Request) -> dict[bytes, bytes]:
    return parse_options_header(request.headers.get("content-type", ""))[1]


def _check_content_length(request: Request, limit: int) -> int | None:
    header = request.headers.get("content-length")
    if header is None:
        return None  # chunked: the limit is enforced while reading
    try:
        length = int(header)
    except ValueError:
        raise InvalidRequest(f"Content-Length {header[:40]!r} is not a number") from None
    if length > limit:
        raise PayloadTooLarge(f"request body is {length} bytes; at most {limit} are accepted")
    return length


async def _limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        yield chunk
    if request.scope.get("state", {}).get(BODY_TRUNCATED):
        announced = request.headers.get("content-length")
        expected = f"the {announced} bytes of its Content-Length" if announced else "its last chunk"
        raise InvalidRequest(f"request body ended after {received} bytes, before {expected}: the client closed "
                             "the connection early")


async def read_json_body(request: Request, limit: int) -> Any:
    """The parsed JSON body: 415 for another content type or charset, 413 over `limit`, 400 if it
    is not JSON or its structure is hostile (`router.edge.safe_json`), 408 if it comes too slowly."""
    media = media_type(request)
    # A missing Content-Type is read as JSON (curl --data-binary); anything else must say JSON.
    if media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {media[:100]}")
    charset = _content_type_params(request).get(b"charset", b"utf-8").decode("latin-1").lower()
    if charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"JSON bodies must be UTF-8; the Content-Type says charset={charset[:40]}")
    _check_content_length(request, limit)
    body = b"".join([chunk async for chunk in _limited_stream(request, limit)])
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object")
    if len(body) > _PARSE_OFF_LOOP_BYTES:
        return await run_in_threadpool(parse_json_body, body)
    return parse_json_body(body)


class _GuardedMultiPartParser(MultiPartParser):
    """Starlette's parser with what it leaves open closed: part headers are bounded (older
    python-multipart versions grow them without limit, by quadratic concatenation), a part that
    is itself multipart is refused rather than read as the text of a field, and a body without
    its closing delimiter is refused rather than read as the parts that happened to be complete."""

    _complete = False

    async def parse(self) -> FormData:
        form = await super().parse()
        if not self._complete:
            await form.close()
            raise MultiPartException("the body ended before its closing delimiter (--BOUNDARY--): it is truncated")
        return form

    def on_end(self) -> None:
        super().on_end()
        self._complete = True

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._header_bytes = 0

    def _count_header(self, start: int, end: int) -> None:
        self._header_bytes += end - start
        if self._header_bytes > _MAX_PART_HEADER_BYTES:
            raise MultiPartException(f"the headers of a part exceed {_MAX_PART_HEADER_BYTES} bytes")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(start, end)
        super().on_header_field(data, start, end)

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(start, end)
        super().on_header_value(data, start, end)

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        for name, value in self._current_part.item_headers:
            if name == b"content-type" and value.strip().lower().startswith(b"multipart/"):
                part_type = value.decode("latin-1")[:60]
                raise MultiPartException(f"part {self._current_part.field_name[:64]!r} is itself multipart "
                                         f"({part_type}); nested multipart bodies are not supported")


@asynccontextmanager
async def multipart_form(request: Request, limits: Limits) -> AsyncIterator[FormData]:
    """The parsed multipart/form-data body (415 for another content type, 413 over the limit, 400
    for a broken or hostile structure, 408 if it comes too slowly); uploads are spooled files,
    closed on exit."""
    limit = max_body_bytes(limits, base64_images=False)
    if media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType(f"Content-Type must be multipart/form-data, not {media_type(request)[:100] or 'none'}")
    boundary = _content_type_params(request).get(b"boundary")
    if not boundary:
        raise InvalidRequest("multipart body could not be parsed: the Content-Type has no boundary parameter")
    if len(boundary) > _MAX_BOUNDARY_CHARS or not _BOUNDARY.match(boundary):
        raise InvalidRequest(f"multipart boundary is not valid: it must be 1 to {_MAX_BOUNDARY_CHARS} characters "
                             "of letters, digits and '()+_,-./:=? (RFC 2046)")
    _check_content_length(request, limit)
    parser = _GuardedMultiPartParser(
        request.headers, _limited_stream(request, limit),
        max_files=limits.max_condition_images + 8,  # we count images ourselves for a clear message
        max_fields=_MAX_FORM_FIELDS, max_part_size=max(4 * limits.max_prompt_chars, 64 * 1024))
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        # Starlette hides python-multipart's reason behind "Invalid multipart data."; say it.
        cause = f" ({str(exc.__cause__)[:200]})" if exc.__cause__ is not None and str(exc.__cause__) else ""
        raise InvalidRequest(f"multipart body could not be parsed: {exc.message}{cause}") from None
    try:
        yield form
    finally:
        await form.close()


def split_edit_form(form: FormData) -> tuple[list[UploadFile], dict[str, str]]:
    """Image uploads (field `image` or `image[]`, in order) and the other fields, each at most once."""
    uploads: list[UploadFile] = []
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if key in ("image", "image[]"):
            if not isinstance(value, UploadFile):
                raise InvalidRequest(f"field {key!r} must be a file upload, not text")
            uploads.append(value)
        elif key == "mask":
            raise InvalidRequest("mask is not supported: GLM-Image conditions on the whole image")
        elif isinstance(value, UploadFile):
            raise InvalidRequest(f"unexpected file field {key[:64]!r}; images go in 'image' or 'image[]'")
        elif key in fields:
            raise InvalidRequest(f"field {key[:64]!r} is given more than once")
        elif "\x00" in value:
            raise InvalidRequest(f"field {key[:64]!r} contains a NUL character, which is not accepted")
        else:
            fields[key] = value
    return uploads, fields


class BodyDeadlineMiddleware:
    """The whole request body must arrive within `timeout_s` of the request headers, else 408
    (`RequestTimeout`, raised from `receive` into whatever is reading the body).

    A client that announces a large body and then sends a byte now and then would otherwise hold
    a connection, a task and a buffer for as long as it likes. Once the body is complete, `receive`
    is passed through untouched (it then only reports a disconnect)."""

    def __init__(self, app: ASGIApp, timeout_s: float, on_timeout: Callable[[], None] = lambda: None):
        self.app = app
        self.timeout_s = timeout_s
        self.on_timeout = on_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s  # the app is called once the headers are complete
        body_done = False

        async def receive_in_time() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                self.on_timeout()
                raise RequestTimeout(f"request body not received in time: the whole body must arrive within "
                                     f"{self.timeout_s:g}s of the request headers") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, receive_in_time, send)
