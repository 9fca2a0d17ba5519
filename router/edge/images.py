"""Safe decoding of client-supplied condition images (multipart uploads and data URLs).

Everything a client sends is hostile until proven otherwise: the byte size is
checked before decoding base64, the pixel count is read from the header and
checked before any pixel is decoded (decompression bombs), only PNG, JPEG and
WebP are opened (no exotic Pillow plugins), and truncated or non-image bytes
give a 400 that says which image is broken.

A decoded image is converted to RGB and moved to the nearest valid size (both
sides multiples of 32, within the side and aspect-ratio limits) with an
explicit LANCZOS resize, then handed on as PNG bytes: the stages trust that
condition images already have valid sizes.

The decoding functions are blocking (CPU-bound); the HTTP layer runs them in a
thread pool.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from common.sizes import ImageSize, nearest_valid_size
from common.stage_config import Limits
from router.core.errors import InvalidRequest, PayloadTooLarge

logger = logging.getLogger(__name__)

# Formats a client may send; Pillow would otherwise also try EPS, TIFF, ICO, ... plugins.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
_ACCEPTED_TEXT = "PNG, JPEG or WebP"

# data:[<mediatype>][;param=value]*;base64,<data>
_DATA_URL = re.compile(r"^data:(?P<media>[^;,]*)(?P<params>(?:;[^;,]*)*?);base64,(?P<data>.*)$", re.DOTALL)

# PNG compression level for condition images: they only travel over the bus to the stages, so speed wins.
_PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class ConditionImage:
    """A decoded condition image, RGB, at a valid size, encoded as PNG."""

    png: bytes
    size: ImageSize


def check_upload_size(num_bytes: int, limits: Limits, what: str) -> None:
    """PayloadTooLarge (413) if an image of `num_bytes` exceeds `limits.max_upload_bytes`."""
    if num_bytes > limits.max_upload_bytes:
        raise PayloadTooLarge(
            f"{what} is {num_bytes} bytes; images may be at most {limits.max_upload_bytes} bytes")


def decode_base64_image(data: str, limits: Limits, what: str) -> bytes:
    """Decode standard base64 (whitespace and missing padding tolerated) into at most max_upload_bytes."""
    # Bound the work before copying the string: 4 base64 characters carry 3 bytes; the
    # 5% slack covers line breaks. The exact check follows the decode.
    if len(data) > (limits.max_upload_bytes * 4 // 3 + 4) * 1.05:
        check_upload_size(len(data) * 3 // 4, limits, what)
    compact = "".join(data.split())  # `base64` wraps lines at 76 characters
    compact += "=" * (-len(compact) % 4)
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"{what} is not valid base64: {exc}") from None
    check_upload_size(len(raw), limits, what)
    return raw


def decode_data_url(url: str, limits: Limits, what: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL; InvalidRequest for any other kind of URL."""
    stripped = url.strip()
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", stripped):
        raise InvalidRequest(
            f"{what}: only data URLs are accepted (data:image/png;base64,...); "
            "this server does not fetch remote URLs")
    match = _DATA_URL.match(stripped)
    if match is None:
        raise InvalidRequest(f"{what} is not a base64 data URL; expected data:image/png;base64,...")
    media = match["media"].strip().lower()
    if media and not media.startswith("image/"):
        raise InvalidRequest(f"{what} has media type {media!r}; expected an image (image/png, image/jpeg, image/webp)")
    return decode_base64_image(match["data"], limits, what)


def load_condition_image(raw: bytes, limits: Limits, what: str) -> ConditionImage:
    """Decode, check, convert to RGB and resize a condition image; InvalidRequest names `what` on failure.

    The pixel count comes from the header and is checked before any pixel is
    decoded, so a small file that claims a huge canvas is rejected cheaply.
    """
    check_upload_size(len(raw), limits, what)
    if not raw:
        raise InvalidRequest(f"{what} is empty")
    try:
        image = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidRequest(f"{what} is not a {_ACCEPTED_TEXT} image") from None
    except Image.DecompressionBombError:
        # Pillow's own guard (2x Image.MAX_IMAGE_PIXELS) fired while reading the header.
        raise _too_many_pixels(what, limits) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidRequest(f"{what} could not be read as a {_ACCEPTED_TEXT} image: {exc}") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidRequest(f"{what} has an empty canvas ({width}x{height})")
        if width * height > limits.max_image_pixels:
            raise InvalidRequest(
                f"{what} is {width}x{height} = {width * height} pixels; "
                f"at most {limits.max_image_pixels} pixels are accepted")
        try:
            image.load()
        except Image.DecompressionBombError:
            raise _too_many_pixels(what, limits) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidRequest(
                f"{what} could not be decoded: the {image.format} data is truncated or corrupt ({exc})") from None
        rgb = _to_rgb(_upright(image, what))
    source = ImageSize(*rgb.size)
    target = nearest_valid_size(source, limits.size_limits)
    if target != source:
        rgb = rgb.resize((target.width, target.height), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return ConditionImage(out.getvalue(), target)


def _too_many_pixels(what: str, limits: Limits) -> InvalidRequest:
    # Pillow refuses, while reading the header, any canvas over twice its MAX_IMAGE_PIXELS.
    return InvalidRequest(f"{what} has more than {2 * Image.MAX_IMAGE_PIXELS} pixels; "
                          f"at most {limits.max_image_pixels} pixels are accepted")


def _upright(image: Image.Image, what: str) -> Image.Image:
    """Apply the EXIF orientation (phone photos); a broken EXIF block is ignored, not fatal."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on malformed EXIF
        logger.info("%s: ignoring unreadable EXIF orientation: %s", what, exc)
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent areas become white rather than whatever colour hides under alpha 0."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
