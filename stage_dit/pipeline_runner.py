"""DiT stage: diffusers' `GlmImagePipeline` without its AR components, driven by prior tokens.

The pipeline is loaded with `vision_language_encoder=None, processor=None`;
passing `prior_token_ids` skips its own AR call. The size comes from the
`original_prompt` (whose two copies of the size were checked to agree when the
job was decoded) and must agree with the prior grid the AR stage produced: a
mismatch is an error, never a silent fallback to 1024x1024.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import GlmImagePipeline
from PIL import Image

from common.cancellable import Cancelled
from common.image_formats import OutputFormat, encode_image
from common.lora import LoraError
from common.protocol import DiTJob, DiTResult
from common.sizes import Grid, ImageSize
from common.stage_config import DiTEngineArgs, LoraSettings
from common.worker_runtime import JobProgressReporter
from model_presets import random_init
from stage_dit.lora import LoraManager, LoraMetrics
from stage_dit.speedups import BlockCache, compile_repeated_blocks

logger = logging.getLogger(__name__)


class DiTInputError(ValueError):
    """The job is inconsistent (sizes disagree between stages); retrying will not help."""


def upsample_grid(grid: np.ndarray) -> torch.Tensor:
    """d32 token grid (h, w) -> flat DiT prior ids at d16, nearest 2x (as the pipeline does)."""
    ids = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.int64))
    return ids.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1).reshape(-1)


class DiTPipelineRunner:
    """Runs one DiT job at a time on its device; `run` is blocking (call it from a thread)."""

    def __init__(self, model_path: str | Path, engine_args: DiTEngineArgs, device: str = "cpu",
                 on_step: Callable[[], None] | None = None, lora: LoraSettings | None = None,
                 lora_metrics: LoraMetrics | None = None):
        """`on_step` is called (from the job's thread) after every completed denoising step:
        the worker counts them in `glm_worker_denoising_steps_total`. With `lora.dir`, jobs may
        carry LoRA adapters from that folder (stage_dit/lora.py)."""
        self.device = torch.device(device)
        self.on_step = on_step
        if random_init.random_init_requested(model_path):
            # Random weights made on the device (model_presets/random_init.py): timing only.
            random_init.warn_random_init(logger, "DiT", model_path, str(self.device))
            self.pipe = random_init.dit_pipeline(model_path, engine_args.torch_dtype, str(self.device))
        else:
            self.pipe = GlmImagePipeline.from_pretrained(
                str(model_path),
                vision_language_encoder=None,
                processor=None,
                dtype=engine_args.torch_dtype,
            ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        # The pipeline keeps per-call state on itself (guidance scale, interrupt flag).
        self._lock = threading.Lock()
        # Optional speed-ups, set once here (stage_dit/speedups.py). Caching goes first: it
        # patches the blocks' forward, which the compiled blocks then trace.
        self.cache = BlockCache(self.pipe.transformer, engine_args.cache) if engine_args.cache else None
        # Before compiling: the manager lists the plain linear layers adapters may target.
        self.lora = (LoraManager(self.pipe.transformer, lora.dir, lora, lora_metrics,
                                 compiled=engine_args.compile is not None)
                     if lora is not None and lora.dir else None)
        if engine_args.compile is not None:
            compile_repeated_blocks(self.pipe.transformer, engine_args.compile)

    def peak_memory_gib(self) -> float | None:
        """Peak GPU memory this worker allocated through torch so far (GiB); None off a GPU."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def run(self, job: DiTJob, cancel: threading.Event, progress: JobProgressReporter | None = None,
            log_tag: str = "-") -> DiTResult:
        """Denoise and decode one image. Stops at the next step once `cancel` is set; reports
        steps done and the previews the job asks for to `progress`."""
        if job.loras and self.lora is None:
            raise DiTInputError("this DiT worker serves no LoRA adapters (no lora.dir / --lora-dir)")
        op = job.original_prompt
        size = self._checked_size(job)
        prior = upsample_grid(job.prior_token_ids)[None, :].to(self.device)
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in op.condition_images]
        prior_image_ids = source_grids = None
        if images:
            if len(job.prior_token_image_ids) != len(images):
                raise DiTInputError(
                    f"{len(images)} condition images but {len(job.prior_token_image_ids)} condition prior grids"
                )
            for img, grid in zip(images, job.prior_token_image_ids):
                if ImageSize(*img.size).grid != Grid(*grid.shape):
                    raise DiTInputError(f"condition image {img.width}x{img.height} does not match prior grid {grid.shape}")
            prior_image_ids = [torch.cat([upsample_grid(g) for g in job.prior_token_image_ids]).to(self.device)]
            source_grids = [torch.tensor([[1, 2 * g.shape[0], 2 * g.shape[1]] for g in job.prior_token_image_ids])]

        watcher = _StepWatcher(self, job, cancel, progress)
        with self._lock:
            if cancel.is_set():
                raise Cancelled()
            if self.lora is not None:
                try:
                    self.lora.activate(job.loras, log_tag)
                except LoraError as exc:
                    raise DiTInputError(str(exc)) from exc
            generator = torch.Generator(device=self.device).manual_seed(op.seed)
            if self.cache is not None:
                # One transformer pass per condition image writes the edit's KV cache first.
                self.cache.start_job(condition_passes=len(images), guidance_scale=op.guidance_scale)
            output = self.pipe(
                prompt=op.prompt,
                image=images or None,
                height=size.height,
                width=size.width,
                num_inference_steps=op.num_inference_steps,
                guidance_scale=op.guidance_scale,
                generator=generator,
                prior_token_ids=prior,
                prior_token_image_ids=prior_image_ids,
                source_image_grid_thw=source_grids,
                callback_on_step_end=watcher,
                output_type="pil",
            )
        if cancel.is_set():
            raise Cancelled()
        image = output.images[0]
        if ImageSize(*image.size) != size:
            raise RuntimeError(f"pipeline produced {image.size[0]}x{image.size[1]}, expected {size}")
        return DiTResult(image=encode_image(image, op.output_format, op.output_compression), output_format=op.output_format,
                         height=size.height, width=size.width)

    @torch.inference_mode()
    def decode_preview(self, latents: torch.Tensor, output_format: OutputFormat) -> bytes:
        """A quick look at `latents`: decoded by the VAE at half resolution (from 512 pixels up)."""
        if min(latents.shape[-2:]) >= 64:
            latents = F.avg_pool2d(latents, 2)
        vae = self.pipe.vae
        shape = (1, vae.config.latent_channels, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        image = vae.decode(latents.to(vae.dtype) * std + mean, return_dict=False)[0]
        return encode_image(self.pipe.image_processor.postprocess(image, output_type="pil")[0], output_format)

    @staticmethod
    def _checked_size(job: DiTJob) -> ImageSize:
        size = job.original_prompt.size
        grid = Grid(*job.prior_token_ids.shape) if job.prior_token_ids.ndim == 2 else None
        if not size.on_grid or grid != size.grid:
            raise DiTInputError(
                f"prior grid {tuple(job.prior_token_ids.shape)} does not fit size {size} "
                f"(needs {size.grid.rows}x{size.grid.cols})"
            )
        return size


class _StepWatcher:
    """The pipeline's step-end callback: stops on cancel, reports steps, makes previews.

    A preview is the predicted clean latent after step i. The flow-matching Euler step is
    x[i+1] = x[i] + (sigma[i+1] - sigma[i]) * v, and the clean estimate is x0 = x - sigma * v,
    so from the latents before and after step i the callback recovers v, then x0, without
    touching the denoising itself (the final image is the same with or without previews).
    Step 0 has no "before" here, so previews start at step 1.
    """

    def __init__(self, runner: DiTPipelineRunner, job: DiTJob, cancel: threading.Event,
                 progress: JobProgressReporter | None):
        self.runner, self.cancel, self.progress = runner, cancel, progress
        self.total = job.original_prompt.num_inference_steps
        self.output_format = job.original_prompt.output_format
        self.preview_steps = sorted(step for step in set(job.preview_steps) if 1 <= step < self.total)
        self.previous: torch.Tensor | None = None  # latents before a preview step
        self.previews_sent = 0

    def __call__(self, pipe, step: int, sigma, callback_kwargs: dict) -> dict:
        if self.runner.on_step is not None:
            self.runner.on_step()  # this step ran, even if the job is cancelled now
        if self.cancel.is_set():
            pipe._interrupt = True  # the pipeline skips the remaining steps
            return callback_kwargs
        latents = callback_kwargs["latents"]
        if step in self.preview_steps and self.previous is not None and self.progress is not None:
            sigmas = pipe.scheduler.sigmas
            velocity = (latents - self.previous) / (sigmas[step + 1] - sigmas[step])
            clean = latents - sigmas[step + 1] * velocity
            preview = self.runner.decode_preview(clean, self.output_format)
            self.progress.preview(self.previews_sent, preview, step + 1, self.total)
            self.previews_sent += 1
        self.previous = latents.clone() if step + 1 in self.preview_steps else None
        if self.progress is not None:
            self.progress.steps(step + 1, self.total)
        return callback_kwargs
