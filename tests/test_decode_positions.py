"""The vLLM model's M-RoPE positions against transformers', without starting vLLM.

For real prompts from the tiny model's processor (`stage_ar/scaffold.py`, as both engines build
them), `MRopePositions` (what the vLLM model's `get_mrope_input_positions` and `forward` run) must give
- the prompt positions of transformers' `GlmImageModel.get_rope_index`, and
- for every generated token k, the (t, h, w) transformers feeds it at: column k of
  `_cached_decode_position_ids` (its decode step reads column `past length - prefill length`).
  The vLLM side starts from vLLM's own linear decode positions (`MRotaryEmbedding.
  get_next_input_positions_tensor`, what its model runner calls with the returned delta) and
  decodes them as the model's `forward` does.

Negative controls: stock linear decode positions and grids started one position late (built in
tests/vllm_broken_positions.py, the variants the engine-level test runs in vLLM) must fail the same
comparison. The engine-level parity (tests/test_vllm_engine.py) covers the rest of the model.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor, BatchFeature
from transformers.models.glm_image.modeling_glm_image import GlmImageModel
from vllm.model_executor.layers.rotary_embedding.mrope import MRotaryEmbedding
from vllm.multimodal.inputs import MultiModalFeatureSpec, MultiModalKwargsItems, PlaceholderRange

from common.sizes import ImageSize, token_layout
from stage_ar.scaffold import build_scaffold
from stage_ar.mrope_positions import FLAG, MRopePositions, condition_grids
from stage_ar.vllm_model import _condition_fields
from tests.vllm_broken_positions import LateGridLayouts, linear_delta

pytestmark = pytest.mark.quick

PROMPT = "a red fox in the snow"

# Text-to-image: square, wide, tall, very wide, and the largest grid (4353 tokens to generate).
T2I_SIZES = [(512, 512), (1024, 512), (512, 1024), (256, 768), (2048, 2048)]
# Image-to-image: condition images (width, height) -> target (width, height).
I2I_CASES = {
    "one-image": ([(384, 256)], (512, 384)),
    "two-images": ([(384, 256), (256, 512)], (768, 256)),
}


@pytest.fixture(scope="module")
def processor(tiny_model):
    return AutoProcessor.from_pretrained(str(tiny_model), subfolder="processor")


@pytest.fixture(scope="module")
def rope_index(tiny_model) -> GlmImageModel:
    """transformers' GlmImageModel (random weights: positions depend on the config only)."""
    config = AutoConfig.from_pretrained(str(tiny_model), subfolder="vision_language_encoder")
    return GlmImageModel(config).eval()


@pytest.fixture(scope="module")
def mrope(tiny_model, rope_index) -> MRopePositions:
    """What the vLLM model holds (it reads the scaffold with the engine's tokenizer, the processor's)."""
    return MRopePositions(str(tiny_model / "processor"), rope_index.config.image_end_token_id)


def _scaffold(processor, size: tuple[int, int], condition_sizes: list[tuple[int, int]]):
    images = [Image.new("RGB", wh, (i * 40, 90, 160)) for i, wh in enumerate(condition_sizes)]
    return build_scaffold(processor, PROMPT, ImageSize(*size), images)


def _reference(rope_index: GlmImageModel, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' prompt positions (3, L) and decode positions (3, tokens to generate),
    called as `GlmImageModel.compute_3d_position_ids` calls it at the prefill."""
    positions, _ = rope_index.get_rope_index(
        inputs["input_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        images_per_sample=inputs["images_per_sample"],
        attention_mask=inputs["attention_mask"],
    )
    return positions[:, 0], rope_index._cached_decode_position_ids[0]


def _mm_features(tokens: list[int], grids: torch.Tensor, image_token_id: int) -> list[MultiModalFeatureSpec]:
    """The condition images as vLLM hands them to `get_mrope_input_positions`: the model's own
    multimodal field config, split into items by vLLM (the VQ ids do not matter for positions)."""
    if len(grids) == 0:
        return []  # text-to-image: vLLM passes no features
    hf_inputs = BatchFeature(
        {"image_token_ids": torch.zeros(int(grids.prod(-1).sum()), dtype=torch.long), "image_grid_thw": grids}
    )
    items = MultiModalKwargsItems.from_hf_inputs(hf_inputs, _condition_fields(hf_inputs))["image"]
    starts = [i for i, t in enumerate(tokens) if t == image_token_id and (i == 0 or tokens[i - 1] != t)]
    return [
        MultiModalFeatureSpec(
            data=item, modality="image", identifier=f"image-{i}",
            mm_position=PlaceholderRange(offset=start, length=int(grid.prod())),
        )
        for i, (item, start, grid) in enumerate(zip(items, starts, grids, strict=True))
    ]


def _decode(mrope: MRopePositions, delta: int, prompt_length: int, count: int) -> torch.Tensor:
    """Positions of generated tokens 0..count-1 as the vLLM model sees them: vLLM's linear
    `sequence index + delta` (the model runner's int64 buffer), then the model's decoding."""
    linear = np.zeros((3, count), dtype=np.int64)
    MRotaryEmbedding.get_next_input_positions_tensor(
        out=linear, out_offset=0, mrope_position_delta=delta, context_len=prompt_length, num_new_tokens=count
    )
    return mrope.decode(torch.from_numpy(linear))


def _first_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> tuple | None:
    """None if equal, else (column, actual (t, h, w), expected (t, h, w)) of the first difference."""
    if actual.shape != expected.shape:
        return ("shape", tuple(actual.shape), tuple(expected.shape))
    differ = (actual != expected).any(dim=0).nonzero()
    if len(differ) == 0:
        return None
    k = int(differ[0])
    return (k, actual[:, k].tolist(), expected[:, k].tolist())


def _cases():
    for w, h in T2I_SIZES:
        yield pytest.param((w, h), [], id=f"t2i-{w}x{h}")
    for name, (conditions, size) in I2I_CASES.items():
        yield pytest.param(size, conditions, id=f"i2i-{name}")


@pytest.mark.parametrize(("size", "condition_sizes"), list(_cases()))
def test_positions_match_transformers(processor, rope_index, mrope, size, condition_sizes):
    inputs = _scaffold(processor, size, condition_sizes)
    tokens = inputs["input_ids"][0].tolist()
    n_conditions = len(condition_sizes)
    ref_prompt, ref_decode = _reference(rope_index, inputs)
    layout = token_layout(ImageSize(*size), image_to_image=bool(condition_sizes))
    # transformers caches one column per generated token: the grids, then EOS.
    assert ref_decode.shape == (3, layout.tokens_to_generate)

    features = _mm_features(tokens, inputs["image_grid_thw"][:n_conditions], rope_index.config.image_token_id)
    grids = condition_grids(features)
    assert grids == [tuple(g[1:]) for g in inputs["image_grid_thw"][:n_conditions].tolist()]
    prompt, delta = mrope.input_positions(tokens, grids)

    assert _first_mismatch(prompt, ref_prompt) is None, _first_mismatch(prompt, ref_prompt)
    decode = _decode(mrope, delta, len(tokens), layout.tokens_to_generate)
    assert _first_mismatch(decode, ref_decode) is None, _first_mismatch(decode, ref_decode)
    # The encoding keeps every position vLLM computes inside int32.
    assert FLAG <= len(tokens) + delta and len(tokens) + delta + layout.tokens_to_generate < 2**31


@pytest.mark.parametrize(("size", "condition_sizes"), [
    pytest.param((512, 512), [], id="t2i-512x512"),
    pytest.param((1024, 512), [], id="t2i-1024x512"),
    pytest.param(I2I_CASES["two-images"][1], I2I_CASES["two-images"][0], id="i2i-two-images"),
])
def test_wrong_decode_positions_are_caught(processor, rope_index, mrope, size, condition_sizes):
    """The comparison above has teeth: stock linear decode positions, or the grids one position
    late, differ from transformers' (the prompt positions stay right: only decoding is broken)."""
    inputs = _scaffold(processor, size, condition_sizes)
    tokens = inputs["input_ids"][0].tolist()
    grids = [tuple(g[1:]) for g in inputs["image_grid_thw"][: len(condition_sizes)].tolist()]
    ref_prompt, ref_decode = _reference(rope_index, inputs)
    count = ref_decode.shape[1]

    prompt, _ = mrope.input_positions(tokens, grids)
    linear = _decode(mrope, linear_delta(prompt, len(tokens)), len(tokens), count)
    late_mrope = copy.copy(mrope)  # the same scaffold reader, its own late layouts
    late_mrope.layouts = LateGridLayouts()
    late_prompt, late_delta = late_mrope.input_positions(tokens, grids)
    late = _decode(late_mrope, late_delta, len(tokens), count)

    assert _first_mismatch(prompt, ref_prompt) is None
    assert _first_mismatch(late_prompt, ref_prompt) is None
    # Linear positions agree on the first grid cell, (p, p, p), and part from the second on.
    assert _first_mismatch(linear, ref_decode)[0] == 1, _first_mismatch(linear, ref_decode)
    assert _first_mismatch(late, ref_decode)[0] == 0, _first_mismatch(late, ref_decode)
    assert torch.equal(late, ref_decode + 1)
