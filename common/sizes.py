"""Image size rules and GLM-Image token math, shared by the router and both stages.

One place decides what a valid size is, so the router can reject a bad size up
front with the nearest valid one, and both stages agree on grid shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# VAE scale 8 x DiT patch 2 x the AR's 2x prior upsampling: both sides must be multiples of 32.
SIZE_MULTIPLE = 32


@dataclass(frozen=True)
class SizeLimits:
    min_side: int = 256
    max_side: int = 2048
    max_aspect_ratio: float = 4.0


class InvalidSize(ValueError):
    """A requested size breaks the rules; the message states the rule and the nearest valid size."""


@dataclass(frozen=True)
class TokenLayout:
    """How many tokens the AR stage writes for one image, and where the target grid sits."""

    target_h: int  # target grid rows (H // 32)
    target_w: int
    preview_h: int  # 0 for image-to-image (no preview grid)
    preview_w: int

    @property
    def target_tokens(self) -> int:
        return self.target_h * self.target_w

    @property
    def preview_tokens(self) -> int:
        return self.preview_h * self.preview_w

    @property
    def tokens_to_generate(self) -> int:
        """Preview grid (t2i only), then the target grid, then EOS."""
        return self.preview_tokens + self.target_tokens + 1

    @property
    def target_offset(self) -> int:
        """Index of the first target-grid token among the generated tokens."""
        return self.preview_tokens


def token_layout(height: int, width: int, image_to_image: bool) -> TokenLayout:
    th, tw = height // SIZE_MULTIPLE, width // SIZE_MULTIPLE
    if image_to_image:
        return TokenLayout(th, tw, 0, 0)
    ratio = th / tw
    half = SIZE_MULTIPLE // 2
    return TokenLayout(th, tw, int(math.sqrt(ratio) * half), int(math.sqrt(1 / ratio) * half))


def _round_to_multiple(value: float) -> int:
    # Half-up, so ties go to the larger size predictably (round() would go to even).
    return max(SIZE_MULTIPLE, math.floor(value / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)


def nearest_valid_size(width: int, height: int, limits: SizeLimits) -> tuple[int, int]:
    """The valid (width, height) closest to the request, keeping its aspect ratio where possible."""
    w, h = float(max(width, 1)), float(max(height, 1))
    ratio = w / h
    max_ratio = limits.max_aspect_ratio
    if ratio > max_ratio:
        w = h * max_ratio
    elif ratio < 1 / max_ratio:
        h = w * max_ratio
    scale = 1.0
    if max(w, h) > limits.max_side:
        scale = limits.max_side / max(w, h)
    if min(w, h) * scale < limits.min_side:
        scale = limits.min_side / min(w, h)
    w, h = w * scale, h * scale
    lo = _round_up(limits.min_side)
    hi = limits.max_side // SIZE_MULTIPLE * SIZE_MULTIPLE
    nw = min(max(_round_to_multiple(w), lo), hi)
    nh = min(max(_round_to_multiple(h), lo), hi)
    # Rounding can push a near-limit ratio just over it; pull the long side in.
    while max(nw, nh) / min(nw, nh) > max_ratio:
        if nw > nh:
            nw -= SIZE_MULTIPLE
        else:
            nh -= SIZE_MULTIPLE
    return nw, nh


def _round_up(value: int) -> int:
    return -(-value // SIZE_MULTIPLE) * SIZE_MULTIPLE


def size_problem(width: int, height: int, limits: SizeLimits) -> str | None:
    """Why (width, height) is not valid, or None if it is."""
    problems = []
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        problems.append(f"both sides must be multiples of {SIZE_MULTIPLE}")
    if not (limits.min_side <= width <= limits.max_side and limits.min_side <= height <= limits.max_side):
        problems.append(f"each side must be between {limits.min_side} and {limits.max_side}")
    if min(width, height) > 0 and max(width, height) / min(width, height) > limits.max_aspect_ratio:
        problems.append(f"the aspect ratio must be at most {limits.max_aspect_ratio:g}:1")
    return "; ".join(problems) if problems else None


def check_size(width: int, height: int, limits: SizeLimits) -> None:
    """Raise InvalidSize, naming the rule and the nearest valid size, unless (width, height) is valid."""
    problem = size_problem(width, height, limits)
    if problem:
        nw, nh = nearest_valid_size(width, height, limits)
        raise InvalidSize(f"size {width}x{height} is not supported: {problem}; the nearest valid size is {nw}x{nh}")


def parse_size(text: str) -> tuple[int, int]:
    """Parse "WxH" into (width, height); raise InvalidSize with the expected form otherwise."""
    parts = text.lower().strip().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InvalidSize(f"size {text!r} is not of the form WIDTHxHEIGHT, e.g. 1024x1024")
    return int(parts[0]), int(parts[1])
