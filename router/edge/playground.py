"""The web playground: one static page at `GET /` that drives the public image API.

The page (`router/edge/static/playground.{html,css,js}`, package data, no build step, no CDN)
asks `GET /playground/limits` for this deployment's limits and defaults, then calls
`POST /v1/images/generations` (or `/v1/images/edits` with condition images) with
`stream: true` and `stream_progress: true`, like any other client. Nothing here
generates images: the page has no private API.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse, Response

from common.sizes import SIZE_MULTIPLE, ImageSize, size_problem
from router.core.image_request import ImageBackend

# The page loads only its own files and talks only to this origin; the images it shows (and
# offers for download) are blob: URLs made from the base64 in the events.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Small files, read per request: no caching, so an upgraded server never pairs old JS with a new API.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
_STATIC = {
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
# Sizes offered as presets (common aspect ratios); only those valid under the limits are listed.
_PRESET_CANDIDATES = [
    (256, 256), (512, 512), (768, 768), (1024, 1024), (1536, 1536), (2048, 2048),
    (1152, 864), (864, 1152), (1344, 768), (768, 1344), (1536, 640), (640, 1536),
    (1024, 512), (512, 1024), (2048, 512), (512, 2048),
]
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound on `partial_images`


def _asset(name: str) -> str:
    return resources.files("router.edge").joinpath("static", name).read_text(encoding="utf-8")


def playground_limits(backend: ImageBackend) -> dict[str, Any]:
    """What the page's controls need: the deployment's limits, the DiT's defaults and the valid presets."""
    limits = backend.config.limits
    dit = backend.config.dit.default_sampling_params
    presets = [ImageSize(width=w, height=h) for w, h in _PRESET_CANDIDATES]
    default = limits.default_image_size
    valid = [str(size) for size in presets if size_problem(size, limits.size_limits) is None]
    if str(default) not in valid:
        valid.insert(0, str(default))
    return {
        "min_side": limits.min_side,
        "max_side": limits.max_side,
        "size_multiple": SIZE_MULTIPLE,
        "max_aspect_ratio": limits.max_aspect_ratio,
        "default_size": str(default),
        "presets": valid,
        "max_n": limits.max_n,
        "max_prompt_chars": limits.max_prompt_chars,
        "max_condition_images": limits.max_condition_images,
        "max_upload_bytes": limits.max_upload_bytes,
        "max_inference_steps": limits.max_inference_steps,
        "max_guidance_scale": limits.max_guidance_scale,
        "max_partial_images": MAX_PARTIAL_IMAGES,
        "num_inference_steps": dit.num_inference_steps,
        "guidance_scale": dit.guidance_scale,
        "seed": backend.config.ar.default_sampling_params.seed,  # the seed of image 0 when none is sent
        "models": backend.models(),
    }


def add_playground_routes(app: FastAPI, backend: ImageBackend) -> None:
    """Serve the playground page at `GET /`, its assets under `/playground/static/`, and
    `GET /playground/limits`. None of them is part of the published API schema."""

    async def page() -> Response:
        return Response(_asset("playground.html"), media_type="text/html; charset=utf-8",
                        headers={**_HEADERS, "Content-Security-Policy": _CSP})

    async def limits() -> JSONResponse:
        return JSONResponse(playground_limits(backend), headers=_HEADERS)

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/playground/limits", limits, methods=["GET"], include_in_schema=False)
    # One route per file rather than a directory mount: nothing else under static/ is reachable.
    for name, media_type in _STATIC.items():
        app.add_api_route(f"/playground/static/{name}", _asset_endpoint(name, media_type), methods=["GET"],
                          include_in_schema=False)


def _asset_endpoint(name: str, media_type: str):
    # A closure, not default arguments: FastAPI would publish those as query parameters.
    async def asset() -> Response:
        return Response(_asset(name), media_type=media_type, headers=_HEADERS)
    return asset
