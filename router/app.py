"""The router's HTTP edge: an OpenAI-compatible API in front of the orchestrator.

Endpoints
  POST /v1/images/generations  JSON, text-to-image
  POST /v1/images/edits        multipart/form-data, image-to-image
  POST /v1/chat/completions    JSON, text- or image-to-image through the chat API
  GET  /v1/models, /health, /ready, /metrics

Everything is validated here, against the deployment's limits, before the
orchestrator sees it: sizes (an omitted size becomes the default size right
here, so it travels exactly like an explicit one), counts, steps, condition
images (decoded, bomb-checked and resized to valid sizes). Inside, the
orchestrator trusts an `ImageRequest`.

Bodies are read by hand rather than by FastAPI's body parameters so that the
size limit applies while reading, a wrong content type is a 415, broken JSON
says so, and validation errors are one readable 400 instead of a 422 dump.
The request schemas are still published in the OpenAPI document.

Every error is `{"error": {"message", "type", "code"}}`. A client that
disconnects cancels its request on the workers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.stage_config import Limits, StageConfig
from router.errors import InvalidRequest, NotFound, PayloadTooLarge, ServiceError, UnsupportedMediaType
from router.http_metrics import HttpMetrics
from router.image_request import GeneratedImage, ImageRequest
from router.images import ConditionImage, check_upload_size, decode_data_url, load_condition_image
from router.schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseImagePart,
    ChatResponseImageURL,
    ChatResponseMessage,
    ErrorResponse,
    ImageData,
    ImageEditForm,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    parse_body,
    resolve_size,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

_MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# A client-chosen request id is echoed only if it is short and harmless in logs and headers.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# nginx's "client closed request": logged and counted, never seen by the gone client.
_STATUS_CLIENT_CLOSED = 499
_MAX_FORM_FIELDS = 64


class ImageBackend(Protocol):
    """What the HTTP edge needs from the orchestrator."""

    config: StageConfig

    async def generate(self, request: ImageRequest) -> list[GeneratedImage]:
        """The n images of `request`; raises ServiceError subclasses. Cancelling cancels the work."""
        ...

    def live_workers(self) -> dict[str, int]:
        """Live workers per stage: {"ar": n, "dit": m}."""
        ...

    def models(self) -> list[str]:
        """Names of the served models."""
        ...


class ClientDisconnected(Exception):
    """The client went away before its images were ready; the work has been cancelled."""


# ---------------------------------------------------------------------------
# Errors


def error_response(status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI-style error body every failure uses."""
    body = {"error": {"message": message, "type": error_type, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


async def _service_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    level = logging.WARNING if exc.status_code >= 500 else logging.INFO
    logger.log(level, "request_id=%s %s %s -> %d: %s", _request_id(request), request.method,
               request.url.path, exc.status_code, exc.message)
    headers = None
    if exc.retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return error_response(exc.status_code, exc.message, exc.error_type, headers)


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


# ---------------------------------------------------------------------------
# Request context: request id, metrics, last-resort error handling


class RequestContextMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would break disconnect detection).

    Gives each request an id (the client's sane `X-Request-Id`, else a new one),
    returns it as a header, records metrics by route template and status, and
    turns any unexpected exception into a logged 500 that names the request id,
    so one bad request never takes the server down.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, routes: Callable[[], list[Any]]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        endpoint = self._endpoint(scope)
        method = scope["method"]
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)

        start = time.perf_counter()
        self.metrics.in_flight.labels(endpoint).inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request_id=%s %s %s: unhandled error", request_id, method, scope.get("path"))
            if not response_started:
                response = error_response(
                    500, f"internal server error; quote request id {request_id} when reporting it", "server_error")
                await response(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.labels(endpoint).dec()
            if status == _STATUS_CLIENT_CLOSED:
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


# ---------------------------------------------------------------------------
# Body reading


def max_body_bytes(limits: Limits, base64_images: bool) -> int:
    """Largest body accepted: room for every condition image plus the rest of the request.

    JSON bodies carry images as base64, 4/3 of their size.
    """
    image_bytes = limits.max_upload_bytes * 4 // 3 if base64_images else limits.max_upload_bytes
    return image_bytes * limits.max_condition_images + limits.max_upload_bytes


def _media_type(request: Request) -> str:
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
    media = _media_type(request)
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


# ---------------------------------------------------------------------------
# Cancellation on disconnect


async def _wait_for_disconnect(receive: Receive) -> None:
    # Called after the body has been read: the next message is http.disconnect.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then raise ClientDisconnected).

    Both tasks are owned here: whichever way this returns (result, error,
    disconnect, or this handler itself being cancelled), neither outlives it.
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request.receive), name="disconnect-watcher")
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        work_task.cancel()  # no-op when finished
        # Let the cancellation run through the orchestrator before the response goes out.
        await asyncio.wait({work_task, watcher})
    if not work_task.cancelled():
        return work_task.result()
    if not watcher.cancelled():
        watcher.exception()  # retrieved so asyncio does not warn
        raise ClientDisconnected()
    raise ServiceError("the request was cancelled inside the server")


# ---------------------------------------------------------------------------
# Endpoints


class _ImageAPI:
    def __init__(self, orchestrator: ImageBackend):
        self.orchestrator = orchestrator
        self.limits = orchestrator.config.limits
        self.started = int(time.time())

    # -- helpers ---------------------------------------------------------------

    def _check_model(self, model: str | None) -> str:
        served = self.orchestrator.models()
        if model is None:
            return served[0] if served else "glm-image"
        if model not in served:
            raise NotFound(f"model {model!r} is not served here; served models: {', '.join(served) or 'none'}")
        return model

    async def _condition_image(self, raw: bytes, what: str) -> ConditionImage:
        # Decoding and LANCZOS resizing take up to ~1 s for big images: keep them off the event loop.
        return await run_in_threadpool(load_condition_image, raw, self.limits, what)

    def _check_image_count(self, count: int) -> None:
        if count > self.limits.max_condition_images:
            if self.limits.max_condition_images == 0:
                raise InvalidRequest("image-to-image is disabled on this server (max_condition_images is 0)")
            raise InvalidRequest(
                f"{count} condition images were sent; at most {self.limits.max_condition_images} are accepted")

    async def _generate(self, request: Request, image_request: ImageRequest) -> list[GeneratedImage]:
        logger.info("request_id=%s job=%s %dx%d n=%d seed=%s condition_images=%d", _request_id(request),
                    image_request.request_id, image_request.width, image_request.height, image_request.n,
                    image_request.seed, len(image_request.condition_images))
        return await run_until_disconnect(request, self.orchestrator.generate(image_request))

    @staticmethod
    def _job_id(request: Request) -> str:
        # Clients may reuse an X-Request-Id; the id the workers see must still be unique.
        request_id = _request_id(request)
        return f"{request_id}-{uuid.uuid4().hex[:8]}"

    # -- endpoints -------------------------------------------------------------

    async def generations(self, request: Request) -> Response:
        """Create images from a prompt (OpenAI `images.generate`)."""
        data = await read_json_body(request, max_body_bytes(self.limits, base64_images=False))
        body = parse_body(ImageGenerationRequest, data, self.limits)
        self._check_model(body.model)
        width, height = resolve_size(body.size, self.limits)
        return await self._images_response(request, body, width, height)

    async def edits(self, request: Request) -> Response:
        """Create images from a prompt and one or more condition images (OpenAI `images.edit`)."""
        limit = max_body_bytes(self.limits, base64_images=False)
        if _media_type(request) != "multipart/form-data":
            raise UnsupportedMediaType(
                f"Content-Type must be multipart/form-data, not {_media_type(request) or 'none'}")
        _check_content_length(request, limit)
        parser = MultiPartParser(
            request.headers, _limited_stream(request, limit),
            max_files=self.limits.max_condition_images + 8,  # we count images ourselves for a clear message
            max_fields=_MAX_FORM_FIELDS, max_part_size=max(4 * self.limits.max_prompt_chars, 64 * 1024))
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise InvalidRequest(f"multipart body could not be parsed: {exc.message}") from None
        try:
            uploads, fields = _split_edit_form(form.multi_items())
            body = parse_body(ImageEditForm, fields, self.limits)
            self._check_model(body.model)
            if not uploads:
                raise InvalidRequest("field 'image' is required: upload one or more images as image or image[]")
            self._check_image_count(len(uploads))
            conditions = []
            for i, upload in enumerate(uploads):
                # The file name is client text: quoted and cut short before it reaches logs and messages.
                what = f"image[{i}] ({upload.filename[:64]!r})" if upload.filename else f"image[{i}]"
                if upload.size is not None:
                    check_upload_size(upload.size, self.limits, what)
                conditions.append(await self._condition_image(await upload.read(), what))
        finally:
            await form.close()
        width, height = resolve_size(body.size, self.limits, auto_size=conditions[0].size)
        return await self._images_response(request, body, width, height, [c.png for c in conditions])

    async def _images_response(
        self, request: Request, body: ImageGenerationRequest | ImageEditForm, width: int, height: int,
        condition_images: list[bytes] | None = None,
    ) -> Response:
        """Run an images-API request and answer in OpenAI's images shape."""
        image_request = ImageRequest(
            request_id=self._job_id(request), prompt=body.prompt, width=width, height=height, n=body.n,
            seed=body.seed, num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
            negative_prompt=body.negative_prompt, condition_images=condition_images or [],
            output_format=body.output_format)
        try:
            images = await self._generate(request, image_request)
        except ClientDisconnected:
            return self._client_gone(request)
        return JSONResponse(_images_response(images, width, height, body.output_format).model_dump(mode="json"))

    async def chat_completions(self, request: Request) -> Response:
        """Text- or image-to-image through the chat API; each image comes back as a data URL."""
        data = await read_json_body(request, max_body_bytes(self.limits, base64_images=True))
        body = parse_body(ChatCompletionRequest, data, self.limits)
        model = self._check_model(body.model)
        prompt = body.prompt_text()
        if not prompt:
            raise InvalidRequest("the user messages contain no text: GLM-Image needs a text prompt")
        if len(prompt) > self.limits.max_prompt_chars:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} characters; at most {self.limits.max_prompt_chars} are allowed")
        size = body.size_text()
        urls = body.image_urls()
        self._check_image_count(len(urls))
        conditions = []
        for i, url in enumerate(urls):
            what = f"image_url[{i}]"
            raw = await run_in_threadpool(decode_data_url, url, self.limits, what)
            conditions.append(await self._condition_image(raw, what))
        width, height = resolve_size(size, self.limits, auto_size=conditions[0].size if conditions else None)
        image_request = ImageRequest(
            request_id=self._job_id(request), prompt=prompt, width=width, height=height, n=body.n,
            seed=body.seed, num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
            negative_prompt=body.negative_prompt, condition_images=[c.png for c in conditions],
            output_format=body.output_format)
        try:
            images = await self._generate(request, image_request)
        except ClientDisconnected:
            return self._client_gone(request)
        response = ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
            choices=[
                ChatChoice(index=i, message=ChatResponseMessage(content=[ChatResponseImagePart(
                    image_url=ChatResponseImageURL(url=_data_url(image)))]))
                for i, image in enumerate(images)
            ],
            **_image_summary(images, width, height, body.output_format))
        return JSONResponse(response.model_dump(mode="json"))

    async def list_models(self) -> ModelList:
        """The served models (OpenAI list shape)."""
        return ModelList(data=[ModelCard(id=name, created=self.started) for name in self.orchestrator.models()])

    async def health(self) -> dict[str, str]:
        """200 while the process is alive."""
        return {"status": "ok"}

    async def ready(self) -> Response:
        """200 when at least one AR and one DiT worker are live, else 503 with the counts."""
        live = self.orchestrator.live_workers()
        missing = [stage for stage in ("ar", "dit") if live.get(stage, 0) < 1]
        if not missing:
            return JSONResponse({"status": "ready", "live_workers": live})
        message = f"no live {' or '.join(missing)} worker"
        return JSONResponse(
            {"status": "not_ready", "live_workers": live,
             "error": {"message": message, "type": "service_unavailable", "code": 503}},
            status_code=503)

    @staticmethod
    def _client_gone(request: Request) -> Response:
        logger.info("request_id=%s client disconnected; request cancelled", _request_id(request))
        return Response(status_code=_STATUS_CLIENT_CLOSED)


def _split_edit_form(items: list[tuple[str, str | UploadFile]]) -> tuple[list[UploadFile], dict[str, str]]:
    """Image uploads (field `image` or `image[]`, in order) and the other fields, each at most once."""
    uploads: list[UploadFile] = []
    fields: dict[str, str] = {}
    for key, value in items:
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


def _image_summary(images: list[GeneratedImage], width: int, height: int, output_format: str) -> dict[str, Any]:
    return {
        "size": f"{width}x{height}",
        "output_format": output_format,
        "seeds": [image.seed for image in images],
        "timings": [image.timings for image in images],
        "stage_sizes": [image.stage_sizes for image in images],
    }


def _images_response(images: list[GeneratedImage], width: int, height: int, output_format: str) -> ImagesResponse:
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageData(b64_json=base64.b64encode(image.image).decode("ascii"), seed=image.seed) for image in images],
        **_image_summary(images, width, height, output_format))


def _data_url(image: GeneratedImage) -> str:
    media = _MEDIA_TYPES.get(image.output_format, "application/octet-stream")
    return f"data:{media};base64,{base64.b64encode(image.image).decode('ascii')}"


# ---------------------------------------------------------------------------
# OpenAPI: the hand-read bodies still get their schemas


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _multipart_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["properties"] = {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "One or more condition images (PNG, JPEG or WebP); also accepted as image[]."},
        **schema["properties"],
    }
    schema["required"] = ["image", *schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def _install_openapi(app: FastAPI, body_models: list[type[BaseModel]]) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in body_models],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [(400, "Invalid request"), (404, "Unknown model"), (413, "Body or image too large"),
                       (415, "Wrong content type"), (429, "Overloaded; see Retry-After"),
                       (502, "A stage failed"), (503, "No live workers"), (504, "Deadline exceeded")]
}


# ---------------------------------------------------------------------------


def create_app(orchestrator: ImageBackend, registry: CollectorRegistry) -> FastAPI:
    """Build the router's FastAPI app around `orchestrator`, exposing `registry` at /metrics.

    Fails at once if the configured default size is not a valid size.
    """
    limits = orchestrator.config.limits
    resolve_size(None, limits)  # an invalid default_size is a config error: fail at startup
    api = _ImageAPI(orchestrator)
    metrics = HttpMetrics(registry)

    app = FastAPI(
        title="GLM-Image router",
        version="0.1.0",
        description="OpenAI-compatible image generation with GLM-Image (AR + DiT stages). "
                    "`negative_prompt` is accepted but GLM-Image has no negative conditioning.",
    )
    app.add_exception_handler(ServiceError, _service_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(RequestValidationError, _request_validation_handler)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, routes=lambda: app.routes)

    app.add_api_route("/v1/images/generations", api.generations, methods=["POST"],
                      response_model=ImagesResponse, responses=_ERROR_RESPONSES,
                      openapi_extra=_json_body(ImageGenerationRequest), summary="Create images")
    app.add_api_route("/v1/images/edits", api.edits, methods=["POST"],
                      response_model=ImagesResponse, responses=_ERROR_RESPONSES,
                      openapi_extra=_multipart_body(ImageEditForm), summary="Create images from images")
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"],
                      response_model=ChatCompletionResponse, responses=_ERROR_RESPONSES,
                      openapi_extra=_json_body(ChatCompletionRequest), summary="Images through the chat API")
    app.add_api_route("/v1/models", api.list_models, methods=["GET"], response_model=ModelList)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/ready", api.ready, methods=["GET"],
                      responses={503: {"description": "A stage has no live worker; the body gives the counts"}})

    async def metrics_endpoint() -> Response:
        """Prometheus metrics: the router's registry, HTTP metrics included."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    _install_openapi(app, [ImageGenerationRequest, ChatCompletionRequest])
    return app
