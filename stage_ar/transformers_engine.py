"""AR engine on Hugging Face transformers: `GlmImageForConditionalGeneration.generate`.

One request at a time per engine. Sampling seeds the global torch RNG right
before `generate()`, exactly as diffusers' `GlmImagePipeline.generate_prior_tokens`
does, so a seed gives the same tokens here as in the reference pipeline; the
lock keeps that seeding from interleaving with another request's sampling.
"""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from transformers import AutoProcessor, GlmImageForConditionalGeneration, StoppingCriteria, StoppingCriteriaList

from common.cancellable import Cancelled, run_cancellable
from common.sizes import token_layout
from common.stage_config import AREngineArgs
from model_presets import random_init
from stage_ar.engine import AREngine, ARGenerationOutput, ARGenerationRequest
from stage_ar.grid_constraint import ImageGridConstraint
from stage_ar.scaffold import build_scaffold

logger = logging.getLogger(__name__)


class _CancelOnEvent(StoppingCriteria):
    """Stops generation at the next token once `event` is set; reports the token count on the way."""

    def __init__(self, event: threading.Event, prompt_length: int, on_tokens: Callable[[int], None] | None):
        self.event, self.prompt_length, self.on_tokens = event, prompt_length, on_tokens

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        if self.on_tokens is not None:
            self.on_tokens(input_ids.shape[1] - self.prompt_length)
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TransformersAREngine(AREngine):
    """Loads `processor` + `vision_language_encoder` from a GLM-Image folder via `from_pretrained`."""

    def __init__(self, model_path: str | Path, engine_args: AREngineArgs, device: str = "cpu"):
        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(str(model_path), subfolder="processor")
        if random_init.random_init_requested(model_path):
            # Random weights made on the device (model_presets/random_init.py): timing only.
            random_init.warn_random_init(logger, "AR", model_path, str(self.device))
            self.model = random_init.ar_model(model_path, engine_args.torch_dtype, str(self.device))
        else:
            self.model = GlmImageForConditionalGeneration.from_pretrained(
                str(model_path), subfolder="vision_language_encoder", dtype=engine_args.torch_dtype
            ).to(self.device)
        self.model.eval()
        config = self.model.config
        self.codebook_size = config.vq_config.num_embeddings
        self.eos_token_id = config.image_end_token_id
        # Our grid constraint replaces suppress_tokens (which would also forbid the final EOS).
        # An empty list, not None: generate() fills None back in from the model's defaults.
        self.generation_config = copy.deepcopy(self.model.generation_config)
        self.generation_config.suppress_tokens = []
        self._lock = threading.Lock()

    def peak_memory_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    async def generate(self, request: ARGenerationRequest,
                       on_tokens: Callable[[int], None] | None = None) -> ARGenerationOutput:
        # Cancelling stops generating at the next token and only then returns (frees the slot).
        return await run_cancellable(lambda cancel: self._generate_blocking(request, cancel, on_tokens))

    @torch.inference_mode()
    def _generate_blocking(self, request: ARGenerationRequest, cancel: threading.Event,
                           on_tokens: Callable[[int], None] | None) -> ARGenerationOutput:
        layout = token_layout(request.size, image_to_image=bool(request.condition_images))
        inputs = build_scaffold(self.processor, request.prompt, request.size, request.condition_images).to(self.device)
        grids = inputs["image_grid_thw"].tolist()
        # The processor's target grid comes right after the condition images' grids.
        target_grid = grids[len(request.condition_images)]
        if target_grid[1:] != [layout.target.rows, layout.target.cols]:
            raise RuntimeError(f"processor built a {target_grid[1:]} grid for {request.size}")

        condition_ids = self._condition_prior_ids(inputs, grids[: len(request.condition_images)])
        prompt_length = inputs["input_ids"].shape[1]
        constraint = ImageGridConstraint(prompt_length, layout.tokens_to_generate, self.codebook_size, self.eos_token_id)
        generation_config = copy.deepcopy(self.generation_config)
        generation_config.max_new_tokens = generation_config.min_new_tokens = layout.tokens_to_generate
        generation_config.do_sample = request.temperature > 0
        if generation_config.do_sample:
            generation_config.temperature = request.temperature
            generation_config.top_p = request.top_p
            generation_config.top_k = request.top_k
        with self._lock:
            if cancel.is_set():
                raise Cancelled(request.job_id)
            torch.manual_seed(request.seed)
            output = self.model.generate(
                **inputs,
                generation_config=generation_config,
                logits_processor=[constraint],
                stopping_criteria=StoppingCriteriaList([_CancelOnEvent(cancel, prompt_length, on_tokens)]),
            )
        if cancel.is_set():
            raise Cancelled(request.job_id)
        generated = output[0, prompt_length:].cpu().numpy().astype(np.int64)
        if generated.shape[0] != layout.tokens_to_generate:
            raise RuntimeError(f"generated {generated.shape[0]} tokens, expected {layout.tokens_to_generate}")
        start = layout.target_offset
        prior = generated[start : start + layout.target.tokens].reshape(layout.target.rows, layout.target.cols)
        return ARGenerationOutput(generated_token_ids=generated, prior_token_ids=prior, prior_token_image_ids=condition_ids)

    def _condition_prior_ids(self, inputs, source_grids: list[list[int]]) -> list[np.ndarray]:
        """VQ ids of each condition image at d32 (what the DiT caches the condition image with)."""
        if not source_grids:
            return []
        grids = torch.tensor(source_grids, device=self.device)
        features = self.model.get_image_features(inputs["pixel_values"], grids).pooler_output
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features), dim=0)
        ids = self.model.get_image_tokens(features, grids)
        split = torch.split(ids, grids.prod(dim=-1).tolist())
        return [part.view(int(g[1]), int(g[2])).cpu().numpy().astype(np.int64) for part, g in zip(split, source_grids)]
