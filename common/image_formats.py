"""The image encodings a client may ask for: one table for the router (media types) and the DiT (encoders)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal, get_args

from PIL import Image

OutputFormat = Literal["png", "jpeg", "webp"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)


@dataclass(frozen=True)
class _Encoding:
    pil_format: str
    media_type: str
    save_options: dict


_ENCODINGS: dict[str, _Encoding] = {
    "png": _Encoding("PNG", "image/png", {}),
    "jpeg": _Encoding("JPEG", "image/jpeg", {"quality": 95}),
    "webp": _Encoding("WEBP", "image/webp", {"quality": 95}),
}


def media_type(output_format: OutputFormat) -> str:
    """The MIME type of an encoded image, e.g. image/png."""
    return _ENCODINGS[output_format].media_type


def encode_image(image: Image.Image, output_format: OutputFormat, quality: int | None = None) -> bytes:
    """`image` encoded as `output_format`; `quality` (0..100) overrides the jpeg/webp default."""
    encoding = _ENCODINGS[output_format]
    options = dict(encoding.save_options)
    if quality is not None and "quality" in options:
        options["quality"] = quality
    buf = io.BytesIO()
    image.save(buf, format=encoding.pil_format, **options)
    return buf.getvalue()
