"""The AR engine interface: what the AR worker asks of an engine (transformers or vLLM)."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ARGenerationRequest:
    """One image's worth of prior tokens to generate."""

    request_id: str
    prompt: str
    height: int  # target size in pixels (from mm_processor_kwargs.target_h / target_w)
    width: int
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
    # The target grid at d32 resolution, shape (H // 32, W // 32).
    prior_token_ids: np.ndarray
    # One d32 grid per condition image (image-to-image), shape (h, w).
    prior_token_image_ids: list[np.ndarray]


class GenerationCancelled(Exception):
    """Raised by `generate` when the request was aborted."""


class AREngine(abc.ABC):
    """Generates GLM-Image prior tokens for requests; implementations may batch internally."""

    @abc.abstractmethod
    async def generate(self, request: ARGenerationRequest) -> ARGenerationOutput:
        """Generate the exact token count the size needs; grid positions hold only image codes."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop generating for `request_id`; its `generate` raises GenerationCancelled."""

    async def shutdown(self) -> None:
        """Release engine resources."""
