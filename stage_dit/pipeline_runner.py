"""DiT stage: diffusers' `GlmImagePipeline` without its AR components, driven by prior tokens.

The pipeline is loaded with `vision_language_encoder=None, processor=None`;
passing `prior_token_ids` skips its own AR call. The size comes from the
`original_prompt` and must agree with the prior grid the AR stage produced:
a mismatch is an error, never a silent fallback to 1024x1024.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import numpy as np
import torch
from diffusers import GlmImagePipeline
from PIL import Image

from common.protocol import DiTJob, DiTResult
from common.sizes import SIZE_MULTIPLE
from common.stage_config import EngineArgs

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PIL_FORMATS = {"png": ("PNG", {}), "jpeg": ("JPEG", {"quality": 95}), "webp": ("WEBP", {"quality": 95})}


class DiTInputError(ValueError):
    """The job is inconsistent (sizes disagree between stages); retrying will not help."""


class DenoiseCancelled(Exception):
    """The job was cancelled; the pipeline stopped at the next denoising step."""


def upsample_grid(grid: np.ndarray) -> torch.Tensor:
    """d32 token grid (h, w) -> flat DiT prior ids at d16, nearest 2x (as the pipeline does)."""
    ids = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.int64))
    return ids.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1).reshape(-1)


class DiTPipelineRunner:
    """Runs one DiT job at a time on its device; `run` is blocking (call it from a thread)."""

    def __init__(self, model_path: str | Path, engine_args: EngineArgs, device: str = "cpu"):
        self.device = torch.device(device)
        self.pipe = GlmImagePipeline.from_pretrained(
            str(model_path),
            vision_language_encoder=None,
            processor=None,
            dtype=_DTYPES[engine_args.dtype],
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        # The pipeline keeps per-call state on itself (guidance scale, interrupt flag).
        self._lock = threading.Lock()

    def run(self, job: DiTJob, cancel: threading.Event) -> DiTResult:
        op = job.original_prompt
        height, width = self._checked_size(job)
        prior = upsample_grid(job.prior_token_ids)[None, :].to(self.device)
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in op.condition_images]
        prior_image_ids = source_grids = None
        if images:
            if len(job.prior_token_image_ids) != len(images):
                raise DiTInputError(
                    f"{len(images)} condition images but {len(job.prior_token_image_ids)} condition prior grids"
                )
            for img, grid in zip(images, job.prior_token_image_ids):
                if (img.height // SIZE_MULTIPLE, img.width // SIZE_MULTIPLE) != grid.shape:
                    raise DiTInputError(f"condition image {img.width}x{img.height} does not match prior grid {grid.shape}")
            prior_image_ids = [torch.cat([upsample_grid(g) for g in job.prior_token_image_ids]).to(self.device)]
            source_grids = [torch.tensor([[1, 2 * g.shape[0], 2 * g.shape[1]] for g in job.prior_token_image_ids])]

        def stop_when_cancelled(pipe, step, timestep, callback_kwargs):
            if cancel.is_set():
                pipe._interrupt = True  # the pipeline skips the remaining steps
            return callback_kwargs

        with self._lock:
            if cancel.is_set():
                raise DenoiseCancelled()
            generator = torch.Generator(device=self.device).manual_seed(op.seed)
            output = self.pipe(
                prompt=op.prompt,
                image=images or None,
                height=height,
                width=width,
                num_inference_steps=op.num_inference_steps,
                guidance_scale=op.guidance_scale,
                generator=generator,
                prior_token_ids=prior,
                prior_token_image_ids=prior_image_ids,
                source_image_grid_thw=source_grids,
                callback_on_step_end=stop_when_cancelled,
                output_type="pil",
            )
        if cancel.is_set():
            raise DenoiseCancelled()
        image = output.images[0]
        if image.size != (width, height):
            raise RuntimeError(f"pipeline produced {image.size[0]}x{image.size[1]}, expected {width}x{height}")
        return DiTResult(image=encode_image(image, op.output_format), output_format=op.output_format, height=height, width=width)

    @staticmethod
    def _checked_size(job: DiTJob) -> tuple[int, int]:
        op = job.original_prompt
        mm = op.mm_processor_kwargs
        if (mm.target_h, mm.target_w) != (op.height, op.width):
            raise DiTInputError(
                f"original_prompt disagrees with itself: height/width {op.height}x{op.width} "
                f"vs mm_processor_kwargs {mm.target_h}x{mm.target_w}"
            )
        expected = (op.height // SIZE_MULTIPLE, op.width // SIZE_MULTIPLE)
        if op.height % SIZE_MULTIPLE or op.width % SIZE_MULTIPLE or tuple(job.prior_token_ids.shape) != expected:
            raise DiTInputError(
                f"prior grid {tuple(job.prior_token_ids.shape)} does not fit size {op.width}x{op.height} "
                f"(needs {expected[0]}x{expected[1]})"
            )
        return op.height, op.width


def encode_image(image: Image.Image, output_format: str) -> bytes:
    fmt, options = _PIL_FORMATS[output_format]
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()
