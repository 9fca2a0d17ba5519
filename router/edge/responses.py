"""How finished images are answered: one function per response kind.

A response kind takes the generated images of one request and renders the
whole HTTP response. The endpoints pick the kind; a new kind (say, a stream)
is one more function here.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

from starlette.responses import JSONResponse

from common.image_formats import media_type
from router.core.image_request import GeneratedImage, ImageRequest
from router.edge.schemas import (
    ChatChoice,
    ChatCompletionResponse,
    ChatResponseImagePart,
    ChatResponseImageURL,
    ChatResponseMessage,
    ImageData,
    ImagesResponse,
)


def stage_sizes(image: GeneratedImage) -> dict[str, list[int]]:
    """The size each stage used, as the API reports it: [height, width] (diffusers' order)."""
    return {stage: [size.height, size.width] for stage, size in image.stage_sizes.items()}


def _summary(request: ImageRequest, images: list[GeneratedImage]) -> dict[str, Any]:
    """What GLM-Image actually did, added to OpenAI's shapes."""
    return {
        "service_tier": request.service_tier,
        "size": str(request.size),
        "output_format": request.output_format,
        "seeds": [image.seed for image in images],
        "timings": [image.timings for image in images],
        "stage_sizes": [stage_sizes(image) for image in images],
    }


def _b64(image: GeneratedImage) -> str:
    return base64.b64encode(image.image).decode("ascii")


def images_response(request: ImageRequest, images: list[GeneratedImage]) -> JSONResponse:
    """OpenAI's images response (generations and edits)."""
    body = ImagesResponse(
        created=int(time.time()),
        data=[ImageData(b64_json=_b64(image), seed=image.seed) for image in images],
        **_summary(request, images))
    return JSONResponse(body.model_dump(mode="json"))


def chat_completion_response(request: ImageRequest, images: list[GeneratedImage], model: str) -> JSONResponse:
    """OpenAI's chat.completion: one choice per image, the image as a data URL."""
    body = ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model,
        choices=[
            ChatChoice(index=i, message=ChatResponseMessage(content=[ChatResponseImagePart(
                image_url=ChatResponseImageURL(url=f"data:{media_type(image.output_format)};base64,{_b64(image)}"))]))
            for i, image in enumerate(images)
        ],
        **_summary(request, images))
    return JSONResponse(body.model_dump(mode="json"))
