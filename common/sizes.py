"""Image sizes and GLM-Image token math, shared by the router and both stages.

One type, `ImageSize(width, height)`, carries a size everywhere: at the HTTP
edge ("WIDTHxHEIGHT"), on the bus, and in both stages. Its `grid` is the AR
stage's token grid (`rows` x `cols`, one token per 32x32 pixels). One place
decides what a valid size is, so the router can reject a bad size up front
with the nearest valid one, and both stages agree on grid shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# VAE scale 8 x DiT patch 2 x the AR's 2x prior upsampling: both sides must be multiples of 32.
SIZE_MULTIPLE = 32


class InvalidSize(ValueError):
    """A requested size breaks the rules; the message states the rule and the nearest valid size."""


@dataclass(frozen=True)
class Grid:
    """A token grid: `rows` x `cols` tokens."""

    rows: int
    cols: int

    @property
    def tokens(self) -> int:
        return self.rows * self.cols


@dataclass(frozen=True)
class ImageSize:
    """An image size in pixels. Written "WIDTHxHEIGHT", like OpenAI's `size`."""

    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    @classmethod
    def parse(cls, text: str) -> "ImageSize":
        """Parse "WxH"; raise InvalidSize with the expected form otherwise."""
        parts = text.lower().strip().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InvalidSize(f"size {text!r} is not of the form WIDTHxHEIGHT, e.g. 1024x1024")
        return cls(width=int(parts[0]), height=int(parts[1]))

    @classmethod
    def of_grid(cls, grid: Grid) -> "ImageSize":
        """The pixel size whose AR token grid is `grid`."""
        return cls(width=grid.cols * SIZE_MULTIPLE, height=grid.rows * SIZE_MULTIPLE)

    @property
    def grid(self) -> Grid:
        """The AR target grid: one token per 32x32 pixels (the processor floors)."""
        return Grid(rows=self.height // SIZE_MULTIPLE, cols=self.width // SIZE_MULTIPLE)

    @property
    def on_grid(self) -> bool:
        """Both sides are positive multiples of 32."""
        return min(self.width, self.height) > 0 and not (self.width % SIZE_MULTIPLE or self.height % SIZE_MULTIPLE)


@dataclass(frozen=True)
class SizeLimits:
    min_side: int = 256
    max_side: int = 2048
    max_aspect_ratio: float = 4.0


@dataclass(frozen=True)
class TokenLayout:
    """How many tokens the AR stage writes for one image, and where the target grid sits."""

    target: Grid
    preview: Grid  # 0x0 for image-to-image (no preview grid)

    @property
    def tokens_to_generate(self) -> int:
        """Preview grid (t2i only), then the target grid, then EOS."""
        return self.preview.tokens + self.target.tokens + 1

    @property
    def target_offset(self) -> int:
        """Index of the first target-grid token among the generated tokens."""
        return self.preview.tokens


def token_layout(size: ImageSize, image_to_image: bool) -> TokenLayout:
    target = size.grid
    if image_to_image:
        return TokenLayout(target, Grid(0, 0))
    ratio = target.rows / target.cols
    half = SIZE_MULTIPLE // 2
    return TokenLayout(target, Grid(rows=int(math.sqrt(ratio) * half), cols=int(math.sqrt(1 / ratio) * half)))


def _round_to_multiple(value: float) -> int:
    # Half-up, so ties go to the larger size predictably (round() would go to even).
    return max(SIZE_MULTIPLE, math.floor(value / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)


def _round_up(value: int) -> int:
    return -(-value // SIZE_MULTIPLE) * SIZE_MULTIPLE


def nearest_valid_size(size: ImageSize, limits: SizeLimits) -> ImageSize:
    """The valid size closest to `size`, keeping its aspect ratio where possible."""
    w, h = float(max(size.width, 1)), float(max(size.height, 1))
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
    return ImageSize(width=nw, height=nh)


def size_problem(size: ImageSize, limits: SizeLimits) -> str | None:
    """Why `size` is not valid, or None if it is."""
    width, height = size.width, size.height
    problems = []
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        problems.append(f"both sides must be multiples of {SIZE_MULTIPLE}")
    if not (limits.min_side <= width <= limits.max_side and limits.min_side <= height <= limits.max_side):
        problems.append(f"each side must be between {limits.min_side} and {limits.max_side}")
    if min(width, height) > 0 and max(width, height) / min(width, height) > limits.max_aspect_ratio:
        problems.append(f"the aspect ratio must be at most {limits.max_aspect_ratio:g}:1")
    return "; ".join(problems) if problems else None


def check_size(size: ImageSize, limits: SizeLimits) -> None:
    """Raise InvalidSize, naming the rule and the nearest valid size, unless `size` is valid."""
    problem = size_problem(size, limits)
    if problem:
        nearest = nearest_valid_size(size, limits)
        raise InvalidSize(f"size {size} is not supported: {problem}; the nearest valid size is {nearest}")
