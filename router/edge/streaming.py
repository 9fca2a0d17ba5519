"""Streamed responses: server-sent events while the images are made.

Images API (`stream: true`), as OpenAI streams images: `<prefix>.partial_image`
events with previews, then one `<prefix>.completed` per image, where the prefix
is `image_generation` or `image_edit`. With `stream_progress: true` the stream
also carries `<prefix>.progress` events (not OpenAI's; off unless asked for).
Chat API (`stream: true`): `chat.completion.chunk`s, one per finished image
whose delta carries the image part, then `[DONE]`.

An error before anything was sent keeps its HTTP status (the stream is only
opened once the request has been admitted); an error after that is an `error`
event in OpenAI's error shape, and the stream ends. A client that closes the
stream cancels the work, down to the AR token or DiT step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from common.image_formats import media_type
from common.sizes import token_layout
from router.edge.disconnect import wait_for_disconnect
from router.core.errors import ServiceError
from router.edge.http_metrics import HttpMetrics
from router.core.image_request import (
    GenerationEvent,
    ImageBackend,
    ImageFinished,
    ImageRequest,
    PartialImage,
    StageProgress,
)
from router.edge.responses import stage_sizes

logger = logging.getLogger(__name__)

# Renders one event as SSE text, or None to leave it out of the stream.
RenderEvent = Callable[[GenerationEvent], "str | None"]


class Generation:
    """A running `backend.generate` whose events are read as they happen. Owns the work task."""

    def __init__(self, work: asyncio.Task, queue: asyncio.Queue, first: GenerationEvent):
        self._work, self._queue, self._first = work, queue, first

    @classmethod
    async def start(cls, backend: ImageBackend, request: ImageRequest) -> "Generation":
        """Start generating and wait until the request is admitted (its first event).

        A failure before that (overload, a request the backend refuses) is raised here, so
        the caller answers it with its own HTTP status, not inside an opened stream."""
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        work = asyncio.create_task(backend.generate(request, queue.put_nowait), name=f"generate:{request.request_id}")
        first = asyncio.create_task(queue.get())
        try:
            await asyncio.wait({work, first}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not first.done():
                first.cancel()
        if first.done() and not first.cancelled():
            return cls(work, queue, first.result())
        # Finished before its first event: it failed (a success always emits events first).
        await asyncio.gather(work, return_exceptions=True)
        work.result()
        raise ServiceError("the generation ended without producing anything")

    async def events(self) -> AsyncIterator[GenerationEvent]:
        """Every event in order; then raises the generation's error, if it failed."""
        yield self._first
        while True:
            next_event = asyncio.ensure_future(self._queue.get())
            try:
                await asyncio.wait({next_event, self._work}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not next_event.done():
                    next_event.cancel()
            if next_event.done() and not next_event.cancelled():
                yield next_event.result()
                continue
            while not self._queue.empty():  # what was emitted before the work returned
                yield self._queue.get_nowait()
            self._work.result()
            return

    async def close(self) -> None:
        """Cancel the work if it still runs, and wait until it has stopped."""
        self._work.cancel()
        await asyncio.gather(self._work, return_exceptions=True)


class EventStreamResponse(Response):
    """`text/event-stream` of a Generation that ends the work when the client leaves.

    Starlette's StreamingResponse notices a gone client only when it next writes; a DiT
    job can go a long time without writing, so this one listens for the disconnect too."""

    media_type = "text/event-stream"

    def __init__(self, generation: Generation, render: RenderEvent, log_tag: str, metrics: HttpMetrics,
                 endpoint: str, done_marker: str | None = None):
        # No body up front, so no Content-Length: the events are written as they come.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation, self.render, self.log_tag = generation, render, log_tag
        self.metrics, self.endpoint, self.done_marker = metrics, endpoint, done_marker
        self.started = time.perf_counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.metrics.streams.labels(self.endpoint).inc()
        writer = asyncio.create_task(self._write(send), name="event-stream")
        watcher = asyncio.create_task(wait_for_disconnect(receive), name="disconnect-watcher")
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            writer.cancel()
            watcher.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            await self.generation.close()
        if watcher.done() and not watcher.cancelled():
            logger.info("[%s] client closed the stream; request cancelled", self.log_tag)
            self.metrics.client_disconnects.labels(self.endpoint).inc()
        elif not writer.cancelled() and writer.exception() is not None:
            raise writer.exception()

    async def _write(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        first = True
        try:
            async for event in self.generation.events():
                text = self.render(event)
                if text is None:
                    continue
                await self._send_text(send, text, first)
                first = False
                self.metrics.stream_events.labels(_event_kind(event)).inc()
        except ServiceError as exc:
            logger.info("[%s] stream ends with an error: %s", self.log_tag, exc.message)
            await self._send_text(send, sse("error", error_body(exc)), first)
        except Exception:
            logger.exception("[%s] stream ends with an unexpected error", self.log_tag)
            await self._send_text(send, sse("error", error_body(ServiceError(
                f"internal server error; quote request id {self.log_tag} when reporting it"))), first)
        else:
            if self.done_marker is not None:
                await self._send_text(send, self.done_marker, first)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_text(self, send: Send, text: str, first: bool) -> None:
        if first:
            self.metrics.stream_first_event.labels(self.endpoint).observe(time.perf_counter() - self.started)
        await send({"type": "http.response.body", "body": text.encode(), "more_body": True})


def _event_kind(event: GenerationEvent) -> str:
    if isinstance(event, PartialImage):
        return "partial_image"
    if isinstance(event, ImageFinished):
        return "completed"
    return "progress"


def sse(event: str | None, data: dict[str, Any]) -> str:
    """One server-sent event."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


def error_body(exc: ServiceError) -> dict[str, Any]:
    return {"error": {"message": exc.message, "type": exc.error_type, "code": exc.code or exc.status_code}}


# ---------------------------------------------------------------------------
# Images API events


def image_event_renderer(request: ImageRequest, prefix: str) -> RenderEvent:
    """Renders GenerationEvents as the images API's stream events (`prefix`: image_generation
    or image_edit). `image_index` tells the n images of a request apart."""
    common = {"size": str(request.size), "quality": request.quality, "background": "opaque",
              "output_format": request.output_format}

    def render(event: GenerationEvent) -> str | None:
        now = int(time.time())
        if isinstance(event, PartialImage):
            kind = f"{prefix}.partial_image"
            return sse(kind, {"type": kind, "b64_json": _b64(event.image), "created_at": now, **common,
                              "partial_image_index": event.partial_image_index, "image_index": event.image_index})
        if isinstance(event, ImageFinished):
            kind = f"{prefix}.completed"
            image = event.image
            return sse(kind, {"type": kind, "b64_json": _b64(image.image), "created_at": now, **common,
                              "usage": _usage(request), "image_index": event.image_index, "seed": image.seed,
                              "timings": image.timings, "stage_sizes": stage_sizes(image)})
        if request.progress:
            kind = f"{prefix}.progress"
            return sse(kind, {"type": kind, "created_at": now, **_progress_fields(event)})
        return None

    return render


def _progress_fields(event: StageProgress) -> dict[str, Any]:
    fields: dict[str, Any] = {"image_index": event.image_index, "stage": event.stage}
    if event.stage in ("ar", "dit"):
        fields.update(done=event.done, total=event.total)
        if event.seconds is not None:
            fields["seconds"] = event.seconds
    elif event.stage == "queued":
        fields["position"] = event.position
    else:
        fields["reason"] = event.reason
    return fields


def _usage(request: ImageRequest) -> dict[str, Any]:
    """OpenAI's usage block, in GLM-Image's AR tokens: the prior tokens generated for the image.
    Input tokens are not counted by the router (0)."""
    output_tokens = token_layout(request.size, image_to_image=bool(request.condition_images)).tokens_to_generate
    return {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": output_tokens, "total_tokens": output_tokens}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------
# Chat API chunks


def chat_chunk_renderer(model: str, service_tier: str) -> RenderEvent:
    """Renders each finished image as a `chat.completion.chunk` (choice `image_index`), with the
    service tier the request ran in, as OpenAI's chunks carry it."""
    chunk_id = f"chatcmpl-{uuid.uuid4().hex}"

    def render(event: GenerationEvent) -> str | None:
        if not isinstance(event, ImageFinished):
            return None
        image = event.image
        url = f"data:{media_type(image.output_format)};base64,{_b64(image.image)}"
        delta = {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        return sse(None, {"id": chunk_id, "object": "chat.completion.chunk", "created": int(time.time()),
                          "model": model, "service_tier": service_tier,
                          "choices": [{"index": event.image_index, "delta": delta, "finish_reason": "stop"}]})

    return render


CHAT_DONE = "data: [DONE]\n\n"
