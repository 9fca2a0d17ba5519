"""The router's HTTP endpoints, OpenAI-compatible.

  POST /v1/images/generations  JSON, text-to-image
  POST /v1/images/edits        multipart/form-data, image-to-image
  POST /v1/chat/completions    JSON, text- or image-to-image through the chat API
  POST /v1/load_lora_adapter, /v1/unload_lora_adapter   LoRA adapters at runtime (vLLM's; docs/lora.md)
  GET  /v1/models, /health, /ready, /metrics
  GET  /metrics/targets        Prometheus HTTP service discovery of the workers' metrics

Each image endpoint does the same three things: parse and validate its body
into an `ImageRequest` (sizes resolved here, an omitted size becoming the
default so it travels exactly like an explicit one; condition images decoded,
bomb-checked and resized to valid sizes; the service tier and the tenant from
the body's `service_tier` and the API key's policy), run it through the backend
while watching for the client to leave (`_serve`), and render one response kind
(`router.edge.responses`). Inside, the orchestrator trusts the `ImageRequest`.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from common.protocol import LoraSpec
from common.sizes import ImageSize
from router.edge.auth import key_policy
from router.edge.disconnect import ClientDisconnected, run_until_disconnect
from router.core.errors import InvalidRequest, NotFound
from router.edge.http_body import max_body_bytes, multipart_form, read_json_body, split_edit_form
from router.core.image_request import ANONYMOUS_TENANT, GeneratedImage, ImageBackend, ImageRequest
from router.core.lora_registry import LoraChoice, LoraRegistry
from router.edge.images import ConditionImage, check_upload_size, decode_data_url, load_condition_image
from router.edge.openapi import LORA_RESPONSES, STREAMING_RESPONSES, json_body, multipart_body
from router.edge.request_context import STATUS_CLIENT_CLOSED, client_request_id, log_tag, request_id
from router.edge.http_metrics import HttpMetrics
from router.edge.responses import chat_completion_response, images_response
from router.edge.streaming import (
    CHAT_DONE,
    EventStreamResponse,
    Generation,
    RenderEvent,
    chat_chunk_renderer,
    image_event_renderer,
)
from router.edge.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ImageEditForm,
    ImageGenerationRequest,
    ImageOptions,
    ImagesResponse,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoraAdapterRequest,
    parse_body,
    resolve_service_tier,
    resolve_size,
)

logger = logging.getLogger(__name__)

RenderImages = Callable[[ImageRequest, list[GeneratedImage]], Response]


class ImageAPI:
    """The endpoints, bound to one backend (the orchestrator) and its deployment limits."""

    def __init__(self, backend: ImageBackend, registry: CollectorRegistry, http_metrics: HttpMetrics):
        self.backend = backend
        self.registry = registry
        self.http_metrics = http_metrics
        self.limits = backend.config.limits
        self.started = int(time.time())
        # The orchestrator's adapters; a backend without any (an edge test's) serves none.
        self.loras: LoraRegistry = getattr(backend, "loras", None) or LoraRegistry(
            backend.config.lora.model_copy(update={"dir": None}), "")

    # -- image endpoints ---------------------------------------------------------

    async def generations(self, request: Request) -> Response:
        """Create images from a prompt (OpenAI `images.generate`)."""
        data = await read_json_body(request, max_body_bytes(self.limits, base64_images=False))
        body = parse_body(ImageGenerationRequest, data, self.limits)
        _, adapter = self._check_model(body.model)
        size = resolve_size(body.size, self.limits)
        loras = await self._loras(body, adapter)
        image_request = self._image_request(request, body, body.prompt, size, loras=loras)
        if body.stream:
            return await self._stream(request, image_request, image_event_renderer(image_request, "image_generation"))
        return await self._serve(request, image_request, images_response)

    async def edits(self, request: Request) -> Response:
        """Create images from a prompt and one or more condition images (OpenAI `images.edit`)."""
        async with multipart_form(request, self.limits) as form:
            uploads, fields = split_edit_form(form)
            body = parse_body(ImageEditForm, fields, self.limits)
            _, adapter = self._check_model(body.model)
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
        size = resolve_size(body.size, self.limits, auto_size=conditions[0].size)
        loras = await self._loras(body, adapter)
        image_request = self._image_request(request, body, body.prompt, size, conditions, loras=loras)
        if body.stream:
            return await self._stream(request, image_request, image_event_renderer(image_request, "image_edit"))
        return await self._serve(request, image_request, images_response)

    async def chat_completions(self, request: Request) -> Response:
        """Text- or image-to-image through the chat API; each image comes back as a data URL."""
        data = await read_json_body(request, max_body_bytes(self.limits, base64_images=True))
        body = parse_body(ChatCompletionRequest, data, self.limits)
        model, adapter = self._check_model(body.model)
        prompt = body.prompt_text()
        if not prompt:
            raise InvalidRequest("the user messages contain no text: GLM-Image needs a text prompt")
        if len(prompt) > self.limits.max_prompt_chars:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} characters; at most {self.limits.max_prompt_chars} are allowed")
        requested_size = body.requested_size()
        urls = body.image_urls()
        self._check_image_count(len(urls))
        conditions = []
        for i, url in enumerate(urls):
            what = f"image_url[{i}]"
            raw = await run_in_threadpool(decode_data_url, url, self.limits, what)
            conditions.append(await self._condition_image(raw, what))
        size = resolve_size(requested_size, self.limits, auto_size=conditions[0].size if conditions else None)
        loras = await self._loras(body, adapter)
        image_request = self._image_request(request, body, prompt, size, conditions, loras=loras)
        if body.stream:
            return await self._stream(request, image_request, chat_chunk_renderer(model, image_request.service_tier), done_marker=CHAT_DONE)
        return await self._serve(
            request, image_request, lambda req, images: chat_completion_response(req, images, model))

    # -- other endpoints ---------------------------------------------------------

    async def list_models(self) -> ModelList:
        """The served models (OpenAI list shape): the base model, then each LoRA adapter with the base
        model as its `parent` (vLLM's convention)."""
        models = self.backend.models()
        cards = [ModelCard(id=name, created=self.started, root=name) for name in models]
        base = models[0] if models else None
        cards += [ModelCard(id=name, created=self.started, root=path, parent=base)
                  for name, path in sorted(self.loras.adapters().items())]
        return ModelList(data=cards)

    async def load_lora_adapter(self, request: Request) -> Response:
        """Serve a LoRA adapter file of the adapter folder under a name (vLLM's endpoint and body)."""
        data = await read_json_body(request, 64 * 1024)
        body = parse_body(LoadLoraAdapterRequest, data, self.limits)
        lora = await run_in_threadpool(self.loras.load, body.lora_name, body.lora_path, log_tag(request),
                                       body.load_inplace)
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully (rank {lora.rank}, "
                        f"{len(lora.modules)} modules, sha256 {lora.digest[:12]}).", media_type="text/plain")

    async def unload_lora_adapter(self, request: Request) -> Response:
        """Stop serving a LoRA adapter (vLLM's endpoint and body)."""
        data = await read_json_body(request, 64 * 1024)
        body = parse_body(UnloadLoraAdapterRequest, data, self.limits)
        self.loras.unload(body.lora_name, log_tag(request))
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    async def health(self) -> dict[str, str]:
        """200 while the process is alive."""
        return {"status": "ok"}

    async def ready(self) -> Response:
        """200 when at least one AR and one DiT worker are live, else 503 with the counts."""
        live = self.backend.live_workers()
        missing = [stage for stage in ("ar", "dit") if live.get(stage, 0) < 1]
        if not missing:
            return JSONResponse({"status": "ready", "live_workers": live})
        message = f"no live {' or '.join(missing)} worker"
        return JSONResponse(
            {"status": "not_ready", "live_workers": live,
             "error": {"message": message, "type": "service_unavailable", "code": 503}},
            status_code=503)

    async def metrics(self) -> Response:
        """Prometheus metrics: the router's registry, HTTP metrics included."""
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def metrics_targets(self) -> Response:
        """Prometheus HTTP service discovery: a target group per worker that serves metrics
        (router/core/service_discovery.py); point `http_sd_configs` here."""
        groups = self.backend.metrics_targets()
        return JSONResponse([group.model_dump() for group in groups], headers={"Cache-Control": "no-store"})

    # -- the shared path of every image endpoint -----------------------------------

    async def _loras(self, body: ImageOptions, adapter: str | None) -> tuple[LoraSpec, ...]:
        """The request's LoRA adapters, checked: the adapter `model` names (at scale 1, unless `loras`
        gives it a scale), then `loras`, in order. Off the event loop: a file seen for the first time
        (or changed) is hashed whole."""
        choices = [LoraChoice(lora.name, lora.scale) for lora in body.loras or []]
        if adapter is not None and adapter not in {choice.name for choice in choices}:
            choices.insert(0, LoraChoice(adapter))
        if not choices:
            return ()
        return await run_in_threadpool(self.loras.resolve, choices)

    def _image_request(self, request: Request, body: ImageOptions, prompt: str, size: ImageSize,
                       conditions: list[ConditionImage] | None = None,
                       loras: tuple[LoraSpec, ...] = ()) -> ImageRequest:
        streaming = body.stream if isinstance(body, (ImageGenerationRequest, ImageEditForm)) else False
        # Who asks: the API key's policy (router/edge/auth.py); without keys, everyone is one tenant.
        policy = key_policy(request)
        return ImageRequest(
            request_id=request_id(request), client_request_id=client_request_id(request), prompt=prompt,
            size=size, n=body.n, seed=body.seed, num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, negative_prompt=body.negative_prompt,
            condition_images=[c.png for c in conditions or []], output_format=body.output_format,
            output_compression=body.output_compression, quality=body.quality,
            ar_temperature=getattr(body, "temperature", None), ar_top_p=getattr(body, "top_p", None),
            partial_images=body.partial_images if streaming else 0,
            progress=body.stream_progress if streaming else False,
            service_tier=resolve_service_tier(body.service_tier, policy.tier if policy else None),
            tenant=policy.name if policy else ANONYMOUS_TENANT,
            tenant_max_images=policy.max_images if policy else None,
            loras=loras)

    async def _serve(self, request: Request, image_request: ImageRequest, render: RenderImages) -> Response:
        """Generate the images, cancelling the work if the client leaves, and render them."""
        logger.info("[%s] %s n=%d seed=%s condition_images=%d tier=%s tenant=%s%s", image_request.log_tag,
                    image_request.size, image_request.n, image_request.seed, len(image_request.condition_images),
                    image_request.service_tier, image_request.tenant, _describe_loras(image_request))
        try:
            images = await run_until_disconnect(request, self.backend.generate(image_request))
        except ClientDisconnected:
            logger.info("[%s] client disconnected; request cancelled", log_tag(request))
            return Response(status_code=STATUS_CLIENT_CLOSED)
        return render(image_request, images)

    async def _stream(self, request: Request, image_request: ImageRequest, render: RenderEvent,
                      done_marker: str | None = None) -> Response:
        """Answer with an event stream; refusals before admission keep their HTTP status."""
        logger.info("[%s] %s n=%d seed=%s condition_images=%d tier=%s tenant=%s%s, streamed", image_request.log_tag,
                    image_request.size, image_request.n, image_request.seed, len(image_request.condition_images),
                    image_request.service_tier, image_request.tenant, _describe_loras(image_request))
        generation = await Generation.start(self.backend, image_request)
        return EventStreamResponse(generation, render, log_tag(request), self.http_metrics, request.url.path,
                                   done_marker)

    def _check_model(self, model: str | None) -> tuple[str, str | None]:
        """The model to name in responses, and the LoRA adapter `model` selects (None: the base model)."""
        served = self.backend.models()
        if model is None:
            return (served[0] if served else "glm-image"), None
        if model in served:
            return model, None
        adapters = self.loras.adapters()
        if model in adapters:
            return model, model
        raise NotFound(f"model {model!r} is not served here; served models: {', '.join(served) or 'none'}"
                       + (f"; LoRA adapters: {', '.join(sorted(adapters))}" if adapters else ""))

    async def _condition_image(self, raw: bytes, what: str) -> ConditionImage:
        # Decoding and LANCZOS resizing take up to ~1 s for big images: keep them off the event loop.
        return await run_in_threadpool(load_condition_image, raw, self.limits, what)

    def _check_image_count(self, count: int) -> None:
        if count > self.limits.max_condition_images:
            if self.limits.max_condition_images == 0:
                raise InvalidRequest("image-to-image is disabled on this server (max_condition_images is 0)")
            raise InvalidRequest(
                f"{count} condition images were sent; at most {self.limits.max_condition_images} are accepted")


def _describe_loras(image_request: ImageRequest) -> str:
    return "".join(f" lora={spec.name}@{spec.scale:g}" for spec in image_request.loras)


def add_routes(app: FastAPI, api: ImageAPI) -> None:
    """Mount the endpoints of `api` on `app`."""
    app.add_api_route("/v1/images/generations", api.generations, methods=["POST"],
                      response_model=ImagesResponse, responses=STREAMING_RESPONSES,
                      openapi_extra=json_body(ImageGenerationRequest), summary="Create images")
    app.add_api_route("/v1/images/edits", api.edits, methods=["POST"],
                      response_model=ImagesResponse, responses=STREAMING_RESPONSES,
                      openapi_extra=multipart_body(ImageEditForm), summary="Create images from images")
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"],
                      response_model=ChatCompletionResponse, responses=STREAMING_RESPONSES,
                      openapi_extra=json_body(ChatCompletionRequest), summary="Images through the chat API")
    app.add_api_route("/v1/models", api.list_models, methods=["GET"], response_model=ModelList)
    app.add_api_route("/v1/load_lora_adapter", api.load_lora_adapter, methods=["POST"], responses=LORA_RESPONSES,
                      openapi_extra=json_body(LoadLoraAdapterRequest), summary="Load a LoRA adapter")
    app.add_api_route("/v1/unload_lora_adapter", api.unload_lora_adapter, methods=["POST"], responses=LORA_RESPONSES,
                      openapi_extra=json_body(UnloadLoraAdapterRequest), summary="Unload a LoRA adapter")
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/ready", api.ready, methods=["GET"],
                      responses={503: {"description": "A stage has no live worker; the body gives the counts"}})
    app.add_api_route("/metrics", api.metrics, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics/targets", api.metrics_targets, methods=["GET"], include_in_schema=False)
