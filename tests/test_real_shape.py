"""The released GLM-Image shapes on CPU: the real-shape preset (model_presets/tiny_model.py).

Same generator and `from_pretrained` path as the tiny model, with the released configuration
(4096-wide GQA decoder with 32/2 heads, head_dim 128, partial rotary 0.5 and M-RoPE sections
[8, 12, 12], vocab 168064 with the released special-token ids, 16384-code VQ, 4096-wide DiT over
16 latent channels, ByT5-small glyph encoder) and one layer per stack, in bfloat16. Built once
into models/ (gitignored) and reused while the generator's version is unchanged.

- the vLLM engine equals the transformers engine on greedy ids and per-step log-probabilities,
  text-to-image and image-to-image at 256x256;
- the served image (router + AR worker + DiT worker) is pixel-identical to diffusers'
  `GlmImagePipeline` run in one process on the same weights, text-to-image and image-to-image.

Both comparisons compute in float32 on the bfloat16 checkpoint. On a CPU without bfloat16
instructions (AVX2 only: no AVX-512 BF16, no AMX) torch's bfloat16 convolutions are ~250x slower
than float32 (a 128-channel 3x3 conv at 128x128: 24.5 s vs 0.1 s on 1 thread), so a 256x256 VAE
pass at the released widths takes many minutes; serving in bfloat16 is proven pixel-identical on
the tiny model instead (tests/test_e2e.py). Every test here is in the slow tier.
"""

from __future__ import annotations

import asyncio
import gc
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import GlmImagePipeline

from common.sizes import ImageSize
from common.stage_config import AREngineArgs
from harness.local_cluster import Cluster, generate, write_stage_config
from model_presets.tiny_model import REAL_SHAPE, build_tiny_model
from stage_ar.engine import ARGenerationRequest
from tests.ar_parity import FLOAT32_TOLERANCE, TOP_K, compare, distinct_share, reference_logprobs
from tests.helpers import b64_image, noise_png, open_image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PROMPT = 'a poster that says "GLM"'
STEPS = 2
SIZE = ImageSize(256, 256)


@pytest.fixture(scope="module")
def real_shape_model() -> Path:
    """The real-shape model; cached under models/ (gitignored), rebuilt when absent or stale (~40 s)."""
    path = Path(os.environ.get("GLM_REAL_SHAPE_MODEL", ROOT / "models" / "real-shape-glm-image"))
    return build_tiny_model(path, preset="real-shape")


def test_built_with_the_released_configuration(real_shape_model):
    """The files carry the released shapes (what vLLM and transformers read), one layer per stack."""
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(str(real_shape_model / "vision_language_encoder"))
    text = config.text_config
    assert (text.vocab_size, text.vision_vocab_size, text.hidden_size, text.intermediate_size) == (
        168064, 16512, 4096, 13696)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (32, 2, 128)
    assert text.rope_parameters["mrope_section"] == [8, 12, 12]
    assert text.rope_parameters["partial_rotary_factor"] == 0.5
    assert (config.image_token_id, config.image_start_token_id, config.image_end_token_id) == (167855, 16384, 16385)
    assert (config.vq_config.num_embeddings, config.vision_config.hidden_size) == (16384, 1536)
    assert config.dtype == torch.bfloat16
    tok = AutoProcessor.from_pretrained(str(real_shape_model), subfolder="processor").tokenizer
    assert len(tok) == 168064 and tok.pad_token_id == 167841
    assert tok.convert_tokens_to_ids(["<|image|>", "<sop>", "<eop>"]) == [167855, 167845, 167846]


# --- the vLLM engine against the transformers engine ---------------------------------------------


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def ar_engines(real_shape_model, loop):
    """(vLLM engine, transformers engine), both in float32 on the bfloat16 checkpoint.

    float32 rather than bfloat16: vLLM's CPU build runs bfloat16, but its kernels round
    differently from torch's eager ones, and over 16384 codes logits of bfloat16 precision
    (8 bits) tie or swap often enough that greedy ids drift apart; in float32 both engines
    compute the same function of the same (bfloat16-valued) weights to ~1e-5."""
    from stage_ar.transformers_engine import TransformersAREngine
    from stage_ar.vllm_engine import VllmAREngine

    # A KV cache of known size (one layer, 2 KV heads of 128: 2 KiB a token in float32, 32768 tokens)
    # instead of a share of RAM, which would have to cover the ~4 GB float32 weights too.
    args = AREngineArgs(dtype="float32", max_num_seqs=2, enforce_eager=True, max_model_len=4096,
                        kv_cache_memory_bytes=64 << 20)
    engines = [loop.run_until_complete(_in_loop(lambda: VllmAREngine(real_shape_model, args, "cpu"))),
               TransformersAREngine(real_shape_model, AREngineArgs(dtype="float32"), "cpu")]
    # No local names for the engines: `real_cluster` empties the list to free them.
    yield engines
    if engines:
        loop.run_until_complete(engines[0].shutdown())


async def _in_loop(factory):
    return factory()


@pytest.mark.parametrize("kind", ["t2i", "i2i"])
def test_vllm_equals_transformers_on_real_shapes(loop, ar_engines, kind):
    engine, reference = ar_engines
    images = [open_image(noise_png(256, 256, seed=3)).convert("RGB")] if kind == "i2i" else []
    req = ARGenerationRequest(f"real-{kind}", PROMPT, SIZE, condition_images=images, temperature=0.0)
    # vLLM decodes in its engine process while transformers decodes here: the longer of the two, not their sum.
    with ThreadPoolExecutor(1) as pool:
        reference_run = pool.submit(reference_logprobs, reference, req)
        out, logprobs = loop.run_until_complete(engine.generate_with_logprobs(req, TOP_K))
        ref_tokens, ref_logprobs = reference_run.result()
    parity = compare(out.generated_token_ids, logprobs, ref_tokens, ref_logprobs)
    assert parity.tokens_equal, parity
    assert parity.max_abs_diff <= FLOAT32_TOLERANCE, parity
    # The real shapes give position-dependent output too (16384 codes).
    distinct, share = distinct_share(out.generated_token_ids)
    assert distinct >= 50 and share <= 0.2, (distinct, share)
    if images:
        ref = loop.run_until_complete(reference.generate(req))
        assert [g.tolist() for g in out.prior_token_image_ids] == [g.tolist() for g in ref.prior_token_image_ids]


# --- served image against GlmImagePipeline in one process ----------------------------------------

# float32 in both workers (see the module docstring), the released sampling defaults (top_k = the vision vocabulary).
REAL_SHAPE_STAGES = {
    "stage_args": [
        {"engine_args": {"dtype": "float32"},
         "default_sampling_params": {"temperature": REAL_SHAPE.temperature, "top_p": REAL_SHAPE.top_p,
                                     "top_k": REAL_SHAPE.vision_vocab_size}},
        {"engine_args": {"dtype": "float32"}},
    ]
}


# One math thread in the workers and in the reference: CPU reductions depend on the thread count.
WORKER_THREADS = 1
CONDITIONS = {"t2i": [], "i2i": [noise_png(256, 256, seed=5)]}


@pytest.fixture(scope="module")
def reference_pipeline(real_shape_model, ar_engines, loop) -> GlmImagePipeline:
    """`GlmImagePipeline` in this process, in float32 (~6 GB), once the AR engines above are freed.

    It runs beside the cluster below (~6 GB more): each test computes its expected image here while
    the cluster serves the same request, on the other core when one is free."""
    # The AR engines above are done by now: free their memory (~9 GB) first.
    loop.run_until_complete(ar_engines[0].shutdown())
    ar_engines.clear()
    gc.collect()
    pipe = GlmImagePipeline.from_pretrained(str(real_shape_model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    del pipe
    gc.collect()


def _expected_image(pipe: GlmImagePipeline, kind: str):
    previous = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)
    try:
        return pipe(
            prompt=PROMPT,
            image=[open_image(c).convert("RGB") for c in CONDITIONS[kind]] or None,
            height=SIZE.height,
            width=SIZE.width,
            num_inference_steps=STEPS,
            guidance_scale=1.5,
            generator=torch.Generator().manual_seed(21),
        ).images[0]
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def real_cluster(real_shape_model, tmp_path_factory, reference_pipeline):
    workdir = tmp_path_factory.mktemp("real-shape-cluster")
    config = write_stage_config(workdir, REAL_SHAPE_STAGES)
    threads = {"OMP_NUM_THREADS": str(WORKER_THREADS), "MKL_NUM_THREADS": str(WORKER_THREADS)}
    with Cluster(model=real_shape_model, workdir=workdir, stage_config=config, model_name="glm-image-real-shape",
                 start_timeout=600, env=threads) as cluster:
        yield cluster


@pytest.mark.parametrize("kind", ["t2i", "i2i"])
def test_served_image_equals_glm_image_pipeline(real_cluster, reference_pipeline, kind):
    def serve() -> httpx.Response:
        if CONDITIONS[kind]:
            files = [("image", ("c.png", CONDITIONS[kind][0], "image/png"))]
            form = {"prompt": PROMPT, "size": "256x256", "seed": "21", "num_inference_steps": str(STEPS)}
            return httpx.post(f"{real_cluster.url}/v1/images/edits", data=form, files=files, timeout=600)
        return generate(real_cluster.url, 21, prompt=PROMPT, size="256x256", steps=STEPS, timeout=600)

    # The cluster serves while this process computes the reference: the longer of the two, not their sum.
    with ThreadPoolExecutor(1) as pool:
        served = pool.submit(serve)
        expected = _expected_image(reference_pipeline, kind)
        response = served.result()
    assert response.status_code == 200, response.text
    got = b64_image(response.json()["data"][0]["b64_json"])
    assert got.size == expected.size
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(expected.convert("RGB")))
