"""What the HTTP layer hands the orchestrator, and what it gets back: one validated image request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

OutputFormat = Literal["png", "jpeg", "webp"]


@dataclass(frozen=True)
class ImageRequest:
    """A validated request for `n` images. Sizes are already checked; condition images are
    normalised PNG bytes whose sides are valid sizes."""

    request_id: str
    prompt: str
    width: int
    height: int
    n: int = 1
    seed: int | None = None  # None: the stage config's default seed
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    condition_images: list[bytes] = field(default_factory=list)
    output_format: OutputFormat = "png"


@dataclass(frozen=True)
class GeneratedImage:
    image: bytes
    output_format: str
    seed: int
    width: int
    height: int
    # Seconds per stage plus queueing: {"ar_s", "dit_s", "total_s"}.
    timings: dict[str, float]
    # The (height, width) each stage reported using: {"ar": [h, w], "dit": [h, w]}.
    stage_sizes: dict[str, list[int]]
