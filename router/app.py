"""The router's HTTP application: the endpoints plus the layers around them.

Where things live, in the order a request meets them:
  request_context.py  ids, metrics, last-resort 500 (ASGI middleware)
  http_body.py        reading bodies with limits (JSON, multipart)
  schemas.py          validation of bodies against the deployment limits
  images.py           safe decoding of condition images
  endpoints.py        the endpoints: body -> ImageRequest -> backend -> response
  disconnect.py       cancelling the work when the client leaves
  responses.py        rendering images as OpenAI responses
  streaming.py        rendering them as a stream of events (images and chat)
  http_errors.py      every error as OpenAI's error shape
  openapi.py          the published schema of the hand-read bodies
"""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from router.endpoints import ImageAPI, add_routes
from router.http_errors import install_error_handlers
from router.http_metrics import HttpMetrics
from router.image_request import ImageBackend
from router.openapi import install_openapi
from router.playground import add_playground_routes
from router.request_context import RequestContextMiddleware
from router.schemas import ChatCompletionRequest, ImageGenerationRequest, resolve_size


def create_app(backend: ImageBackend, registry: CollectorRegistry) -> FastAPI:
    """Build the router's FastAPI app around `backend`, exposing `registry` at /metrics.

    Fails at once if the configured default size is not a valid size.
    """
    resolve_size(None, backend.config.limits)  # an invalid default_size is a config error: fail at startup
    app = FastAPI(
        title="GLM-Image router",
        version="0.1.0",
        description="OpenAI-compatible image generation with GLM-Image (AR + DiT stages). "
                    "`negative_prompt` is accepted but GLM-Image has no negative conditioning.",
    )
    install_error_handlers(app)
    http_metrics = HttpMetrics(registry)
    app.add_middleware(RequestContextMiddleware, metrics=http_metrics, routes=lambda: app.routes)
    add_routes(app, ImageAPI(backend, registry, http_metrics))
    add_playground_routes(app, backend)  # the web playground at GET / (router/playground.py)
    install_openapi(app, [ImageGenerationRequest, ChatCompletionRequest])
    return app
