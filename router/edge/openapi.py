"""The OpenAPI document: the hand-read request bodies still get their schemas."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from router.edge.schemas import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [(400, "Invalid request"), (401, "Missing or invalid API key (when the router has keys)"),
                       (404, "Unknown model"), (408, "Request headers or body not received in time"),
                       (413, "Body or image too large"),
                       (415, "Wrong content type"), (429, "Overloaded; see Retry-After"),
                       (431, "Request headers too large"),
                       (502, "A stage failed"), (503, "No live workers"), (504, "Deadline exceeded")]
}

# vLLM's LoRA endpoints answer with a line of text.
LORA_RESPONSES: dict[int | str, dict[str, Any]] = {
    **{code: ERROR_RESPONSES[code] for code in (400, 401, 404, 408, 413, 415, 431)},
    200: {"description": "Done; a line of text says what was done (vLLM's answer)",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
    403: {"model": ErrorResponse, "description": "Runtime adapter updates are disabled (lora.runtime_updates: false)"},
}


# Image endpoints answer with JSON, or with server-sent events when the body says `stream: true`.
STREAMING_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    200: {"description": "The images (JSON), or with `stream: true` server-sent events (docs/streaming.md)",
          "content": {"text/event-stream": {"schema": {"type": "object", "description": "the data of one event"}}}},
}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for an endpoint whose JSON body is `model`."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def multipart_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for the edits endpoint: `model`'s fields plus the image uploads."""
    schema = model.model_json_schema()
    schema["properties"] = {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "One or more condition images (PNG, JPEG or WebP); also accepted as image[]."},
        **schema["properties"],
    }
    schema["required"] = ["image", *schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def install_openapi(app: FastAPI, body_models: list[type[BaseModel]]) -> None:
    """Generate the document once, with `body_models` added to its component schemas."""
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
