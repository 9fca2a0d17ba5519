"""Step-by-step parity of the vLLM AR engine with transformers, on log-probabilities.

Comparing greedy ids alone is weak: a wrong decode position often leaves the argmax unchanged.
Here every generated grid token is compared on the log-probabilities vLLM reports (its top-k plus
the sampled id) against transformers' log-softmax of the same step's raw logits.

What vLLM reports: with its default `logprobs_mode="raw_logprobs"` the sampler takes the
log-softmax of the model's logits *before* any logits processor (vllm/v1/sample/sampler.py:
`compute_logprobs(logits)` ahead of `apply_logits_processors` and the `allowed_token_ids` mask).
Our vLLM model pads the lm_head's vision-vocabulary logits with -inf, so that is the log-softmax
over the vision vocabulary. transformers' `output_logits=True` returns the same raw lm_head logits
per step (before the grid constraint), so both sides compare the same quantity.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from common.sizes import token_layout
from stage_ar.engine import ARGenerationRequest
from stage_ar.grid_constraint import ImageGridConstraint
from stage_ar.scaffold import build_scaffold

# Max |log p_vLLM - log p_transformers| over every compared id and step, both engines in float32.
# Measured well below this (see docs/vllm_engine.md); a decode position off by one moves it by
# orders of magnitude more.
FLOAT32_TOLERANCE = 1e-3
# How many of the likeliest ids per step vLLM reports (its default max_logprobs is 20).
TOP_K = 20


@dataclass(frozen=True)
class Parity:
    """How one vLLM generation compares with the transformers reference."""

    tokens_equal: bool
    first_divergence: int | None  # first generated index whose ids differ
    max_abs_diff: float  # over the compared steps (up to and including the first divergence)
    worst_step: int
    steps_compared: int
    # max |difference| of each compared step; step 0 comes from the prefill (prompt positions only)
    step_diffs: tuple[float, ...] = field(default=(), repr=False)

    def holds(self, tolerance: float) -> bool:
        return self.tokens_equal and self.max_abs_diff <= tolerance


@torch.inference_mode()
def reference_logprobs(engine, request: ARGenerationRequest) -> tuple[np.ndarray, torch.Tensor]:
    """Greedy tokens and per-step log-probabilities over the vision vocabulary from a
    `TransformersAREngine`'s model, with the engine's own scaffold and grid constraint."""
    layout = token_layout(request.size, image_to_image=bool(request.condition_images))
    inputs = build_scaffold(engine.processor, request.prompt, request.size, request.condition_images).to(engine.device)
    prompt_length = inputs["input_ids"].shape[1]
    constraint = ImageGridConstraint(prompt_length, layout.tokens_to_generate, engine.codebook_size, engine.eos_token_id)
    config = copy.deepcopy(engine.generation_config)
    config.max_new_tokens = config.min_new_tokens = layout.tokens_to_generate
    config.do_sample = False
    out = engine.model.generate(
        **inputs,
        generation_config=config,
        logits_processor=[constraint],
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, prompt_length:].cpu().numpy().astype(np.int64)
    logits = torch.stack(out.logits)[:, 0].float()  # (steps, vision vocab), raw
    return tokens, torch.log_softmax(logits, dim=-1)


def compare(vllm_tokens: np.ndarray, vllm_logprobs: list[dict[int, float]], ref_tokens: np.ndarray,
            ref_logprobs: torch.Tensor) -> Parity:
    """Compare generations step by step; steps after the first differing id are not compared
    (their contexts differ), the differing step itself is (its context is still the same)."""
    if len(vllm_logprobs) != len(vllm_tokens) - 1:  # no logprobs for the appended EOS
        raise ValueError(f"{len(vllm_logprobs)} logprob steps for {len(vllm_tokens)} tokens")
    n = min(len(vllm_tokens), len(ref_tokens))
    differ = np.nonzero(vllm_tokens[:n] != ref_tokens[:n])[0]
    first = int(differ[0]) if len(differ) else None
    tokens_equal = first is None and len(vllm_tokens) == len(ref_tokens)
    steps = len(vllm_logprobs) if first is None else min(first + 1, len(vllm_logprobs))
    step_diffs = tuple(
        max((abs(logprob - float(ref_logprobs[step, token])) for token, logprob in vllm_logprobs[step].items()),
            default=0.0)
        for step in range(steps)
    )
    worst_step = int(np.argmax(step_diffs)) if step_diffs else 0
    worst = step_diffs[worst_step] if step_diffs else 0.0
    return Parity(tokens_equal, first, worst, worst_step, steps, step_diffs)


def distinct_share(tokens: np.ndarray) -> tuple[int, float]:
    """(distinct ids, share of the commonest id) among the grid tokens (EOS excluded)."""
    grid = tokens[:-1]
    counts = np.bincount(grid)
    return int((counts > 0).sum()), float(counts.max() / len(grid))
