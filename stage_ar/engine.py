"""The AR engine interface: what the AR worker asks of an engine (transformers or vLLM)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from common.sizes import ImageSize


@dataclass(frozen=True)
class ARGenerationRequest:
    """One image's worth of prior tokens to generate."""

    job_id: str  # unique among the engine's requests (the bus job id)
    prompt: str
    size: ImageSize  # the target size in pixels (the job's mm_processor_kwargs)
    condition_images: list[Image.Image] = field(default_factory=list)
    # temperature 0 means greedy decoding.
    temperature: float = 0.9
    top_p: float = 0.75
    top_k: int = 16512
    seed: int = 42


@dataclass(frozen=True)
class ARGenerationOutput:
    # All generated tokens: preview grid (t2i), target grid, EOS.
    generated_token_ids: np.ndarray
    # The target grid at d32 resolution, shape (rows, cols) of the size's grid.
    prior_token_ids: np.ndarray
    # One d32 grid per condition image (image-to-image), shape (rows, cols).
    prior_token_image_ids: list[np.ndarray]


class AREngine(abc.ABC):
    """Generates GLM-Image prior tokens for requests; implementations may batch internally."""

    @abc.abstractmethod
    async def generate(self, request: ARGenerationRequest,
                       on_tokens: Callable[[int], None] | None = None) -> ARGenerationOutput:
        """Generate the exact token count the size needs; grid positions hold only image codes.

        `on_tokens(n)` is called (from any thread) as the count of generated tokens grows.
        Cancelling the awaiting task stops the generation (at the next token) before it returns."""

    def peak_memory_gib(self) -> float | None:
        """Peak GPU memory this process allocated through torch so far (GiB), where the engine's model
        lives in this process on a GPU; None otherwise (CPU, or vLLM's engine-core process)."""
        return None

    async def shutdown(self) -> None:
        """Release engine resources."""
