"""The router's HTTP application: the endpoints plus the layers around them.

Where things live, in the order a request meets them:
  http_limits.py      per connection: header deadline and size, connection cap (uvicorn protocol)
  request_context.py  ids, metrics, last-resort 500 (ASGI middleware)
  auth.py             API keys on /v1/* (ASGI middleware, before any body is read)
  http_body.py        reading bodies with limits: deadline, size, type (JSON, multipart)
  safe_json.py        JSON parsed with limits on depth, values, numbers, keys, encoding
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

from router.edge.auth import ApiKeyConfig, ApiKeyMiddleware, ApiKeys, AuthMetrics
from router.edge.endpoints import ImageAPI, add_routes
from router.edge.http_body import BodyDeadlineMiddleware
from router.edge.http_errors import install_error_handlers
from router.edge.http_limits import HttpLimitMetrics
from router.edge.http_metrics import HttpMetrics
from router.core.image_request import ImageBackend
from router.edge.openapi import install_openapi
from router.edge.playground import add_playground_routes
from router.edge.request_context import RequestContextMiddleware
from router.edge.schemas import (
    ChatCompletionRequest,
    ImageGenerationRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    resolve_size,
)


def create_app(backend: ImageBackend, registry: CollectorRegistry, api_keys: ApiKeyConfig | None = None,
               limit_metrics: HttpLimitMetrics | None = None) -> FastAPI:
    """Build the router's FastAPI app around `backend`, exposing `registry` at /metrics.

    With `api_keys`, /v1/* (and /metrics with `protect_metrics`) need one of them. `limit_metrics`
    are the connection limits' metrics when the server made them (router/edge/http_limits.py).
    Fails at once if the configured default size is not a valid size, or a key file is unreadable.
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
    limit_metrics = limit_metrics or HttpLimitMetrics(registry)
    # Added innermost first: a request meets RequestContext, then the API key check, then the body deadline.
    app.add_middleware(BodyDeadlineMiddleware, timeout_s=backend.config.router.http_body_timeout_s,
                       on_timeout=limit_metrics.closed.labels("body_timeout").inc)
    if api_keys is not None:
        app.add_middleware(ApiKeyMiddleware, keys=ApiKeys(api_keys), metrics=AuthMetrics(registry))
    app.add_middleware(RequestContextMiddleware, metrics=http_metrics, routes=lambda: app.routes)
    add_routes(app, ImageAPI(backend, registry, http_metrics))
    add_playground_routes(app, backend)  # the web playground at GET / (router/edge/playground.py)
    install_openapi(app, [ImageGenerationRequest, ChatCompletionRequest, LoadLoraAdapterRequest, UnloadLoraAdapterRequest])
    return app
