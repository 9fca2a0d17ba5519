"""Reading request bodies by hand, with the size limit applied while reading.

FastAPI's body parameters are not used so that a body over the limit is a 413
before it is all in memory, a wrong content type is a 415, broken JSON says so,
and validation errors are one readable 400 instead of a 422 dump.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from common.stage_config import Limits
from router.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

_MAX_FORM_FIELDS = 64


def max_body_bytes(limits: Limits, base64_images: bool) -> int:
    """Largest body accepted: room for every condition image plus the rest of the request.

    JSON bodies carry images as base64, 4/3 of their size.
    """
    image_bytes = limits.max_upload_bytes * 4 // 3 if base64_images else limits.max_upload_bytes
    return image_bytes * limits.max_condition_images + limits.max_upload_bytes


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _check_content_length(request: Request, limit: int) -> None:
    header = request.headers.get("content-length")
    if header is None:
        return  # chunked: the limit is enforced while reading
    try:
        length = int(header)
    except ValueError:
        raise InvalidRequest(f"Content-Length {header!r} is not a number") from None
    if length > limit:
        raise PayloadTooLarge(f"request body is {length} bytes; at most {limit} are accepted")


async def _limited_stream(request: Request, limit: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        yield chunk


async def read_json_body(request: Request, limit: int) -> Any:
    """The parsed JSON body: 415 for another content type, 413 over `limit`, 400 if not JSON."""
    media = media_type(request)
    # A missing Content-Type is read as JSON (curl --data-binary); anything else must say JSON.
    if media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type must be application/json, not {media}")
    _check_content_length(request, limit)
    body = b"".join([chunk async for chunk in _limited_stream(request, limit)])
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None


@asynccontextmanager
async def multipart_form(request: Request, limits: Limits) -> AsyncIterator[FormData]:
    """The parsed multipart/form-data body (415 for another content type, 413 over the limit);
    uploads are spooled files, closed on exit."""
    limit = max_body_bytes(limits, base64_images=False)
    if media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType(f"Content-Type must be multipart/form-data, not {media_type(request) or 'none'}")
    _check_content_length(request, limit)
    parser = MultiPartParser(
        request.headers, _limited_stream(request, limit),
        max_files=limits.max_condition_images + 8,  # we count images ourselves for a clear message
        max_fields=_MAX_FORM_FIELDS, max_part_size=max(4 * limits.max_prompt_chars, 64 * 1024))
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidRequest(f"multipart body could not be parsed: {exc.message}") from None
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
            raise InvalidRequest(f"unexpected file field {key!r}; images go in 'image' or 'image[]'")
        elif key in fields:
            raise InvalidRequest(f"field {key!r} is given more than once")
        else:
            fields[key] = value
    return uploads, fields
