"""The transformers AR engine: exact token counts, constrained grids, parity with the pipeline's AR."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch
from diffusers import GlmImagePipeline
from PIL import Image

from common.sizes import ImageSize, token_layout
from common.stage_config import AREngineArgs
from stage_ar.engine import ARGenerationRequest
from stage_ar.scaffold import build_scaffold
from stage_ar.transformers_engine import TransformersAREngine

pytestmark = pytest.mark.quick

PROMPT = 'a cat holding a sign that says "GLM"'


@pytest.fixture(scope="module")
def engine(tiny_model):
    return TransformersAREngine(tiny_model, AREngineArgs(dtype="float32"))


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return GlmImagePipeline.from_pretrained(str(tiny_model))


def _cond(w, h, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _request(w, h, images=(), seed=7, **kw):
    return ARGenerationRequest(job_id=f"r{seed}", prompt=PROMPT, size=ImageSize(width=w, height=h), condition_images=list(images), temperature=0.9, top_p=0.75, top_k=136, seed=seed, **kw)


def test_random_weights_without_the_constraint_would_emit_non_codes(engine):
    """Why constrained decoding matters: unconstrained sampling leaves the codebook."""
    inputs = build_scaffold(engine.processor, PROMPT, ImageSize(256, 256), [])
    config = copy.deepcopy(engine.generation_config)
    config.update(max_new_tokens=200, min_new_tokens=200, do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    torch.manual_seed(0)
    out = engine.model.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1] :]
    assert (out >= engine.codebook_size).any()


@pytest.mark.parametrize("w,h,n_images", [(256, 256, 0), (512, 256, 0), (256, 512, 1), (256, 256, 2)])
def test_grid_holds_only_codes_and_the_count_is_exact(engine, w, h, n_images):
    images = [_cond(256 + 32 * i, 256, i) for i in range(n_images)]
    out = asyncio.run(engine.generate(_request(w, h, images)))
    layout = token_layout(ImageSize(width=w, height=h), image_to_image=bool(images))
    assert out.generated_token_ids.shape == (layout.tokens_to_generate,)
    assert out.generated_token_ids[-1] == engine.eos_token_id
    assert out.generated_token_ids[:-1].max() < engine.codebook_size
    assert out.prior_token_ids.shape == (h // 32, w // 32)
    assert [g.shape for g in out.prior_token_image_ids] == [(img.height // 32, img.width // 32) for img in images]


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_same_tokens_as_the_pipelines_own_ar(engine, pipe, n_images):
    images = [_cond(256 + 64 * i, 256, i) for i in range(n_images)]
    ref_ids, ref_image_ids, ref_grids = pipe.generate_prior_tokens(
        prompt=PROMPT, height=256, width=256, image=[images] if images else None, device=torch.device("cpu"), generator=torch.Generator().manual_seed(9)
    )
    out = asyncio.run(engine.generate(_request(256, 256, images, seed=9)))
    up = torch.from_numpy(out.prior_token_ids).repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(1, -1)
    assert torch.equal(up, ref_ids)
    if images:
        mine = torch.cat([torch.from_numpy(g).repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(-1) for g in out.prior_token_image_ids])
        assert torch.equal(mine, ref_image_ids[0])


def test_greedy_is_deterministic_regardless_of_seed(engine):
    a = asyncio.run(engine.generate(ARGenerationRequest(job_id="g1", prompt=PROMPT, size=ImageSize(256, 256), temperature=0, seed=1)))
    b = asyncio.run(engine.generate(ARGenerationRequest(job_id="g2", prompt=PROMPT, size=ImageSize(256, 256), temperature=0, seed=2)))
    np.testing.assert_array_equal(a.generated_token_ids, b.generated_token_ids)


def test_cancelling_generate_stops_the_generation(engine):
    async def run():
        # 2048x2048 is 4353 tokens: far longer than the cancellation takes to land.
        task = asyncio.create_task(engine.generate(ARGenerationRequest(job_id="cancel-me", prompt=PROMPT, size=ImageSize(2048, 2048))))
        while not engine._lock.locked():  # generation has started in its thread
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=30)
        # generate() returns only once the thread has stopped generating.
        assert not engine._lock.locked()

    asyncio.run(run())
