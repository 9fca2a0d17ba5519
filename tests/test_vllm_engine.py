"""The vLLM AR engine against transformers' GlmImageForConditionalGeneration.generate.

Greedy decoding must give the same tokens, token for token, as transformers with a
mask that allows only image codes at grid positions and EOS at the last one, and at every
step the same log-probabilities within `FLOAT32_TOLERANCE` (tests/ar_parity.py); for
image-to-image also the condition images' VQ ids (`prior_token_image_ids`), against
the transformers engine (`TransformersAREngine`). The check has teeth: the same engine with
stock linear decode positions, or its grids started one position late, fails it (slow tier: those
tests start engines of their own, after the module's shared one is stopped, so they come last).
vLLM (its CPU build) is part of the project environment, so this runs in the normal suite.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from PIL import Image

from common.sizes import ImageSize, token_layout
from common.stage_config import AREngineArgs
from stage_ar.engine import ARGenerationRequest
from tests.ar_parity import FLOAT32_TOLERANCE, TOP_K, compare, distinct_share, reference_logprobs

# The tiny model's greedy 512x512 grid must vary with the position (model_presets/tiny_model.py
# `_diversify_ar`), or a wrong decode position could leave the output unchanged.
MIN_DISTINCT_IDS = 50
MAX_ID_SHARE = 0.2

PROMPT = "a red fox in the snow"
KV_CACHE_BYTES = 64 << 20  # 131072 tokens of the tiny model (512 B each): plenty


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _start_engine(loop, model, max_num_seqs: int = 16):
    from stage_ar.vllm_engine import VllmAREngine

    async def start():
        # float32 like the transformers reference, so greedy argmaxes agree exactly.
        args = AREngineArgs(
            dtype="float32",
            max_num_seqs=max_num_seqs,
            kv_cache_memory_bytes=KV_CACHE_BYTES,
            enforce_eager=True,
        )
        return VllmAREngine(model, args, "cpu")

    return loop.run_until_complete(start())


# The module's one normal engine while it runs; the slow tests stop it (`_stop_shared_engine`).
_shared: dict = {"engine": None, "stopped": False}


@pytest.fixture(scope="module")
def engine(tiny_model, loop):
    """The module's one normal vLLM engine, started once for every test that uses it."""
    assert not _shared["stopped"], "a slow test stopped the shared engine: the slow tests must come last"
    eng = _shared["engine"] = _start_engine(loop, tiny_model)
    yield eng
    _shared["engine"] = None
    loop.run_until_complete(eng.shutdown())


def _stop_shared_engine(loop) -> None:
    """One vLLM engine at a time (on CPU each reserves a share of RAM): the slow tests stop the
    shared engine for good before starting theirs; they come last, so nothing needs it again."""
    eng, _shared["engine"] = _shared["engine"], None
    if eng is not None:
        _shared["stopped"] = True
        loop.run_until_complete(eng.shutdown())


@pytest.fixture(scope="module")
def transformers_engine(tiny_model):
    from stage_ar.transformers_engine import TransformersAREngine

    return TransformersAREngine(tiny_model, AREngineArgs(dtype="float32"), "cpu")


def _condition_images(*sizes: tuple[int, int]) -> list[Image.Image]:
    """Noise images of the given (width, height): every VQ id depends on real pixels."""
    rng = np.random.default_rng(sum(w * 7 + h for w, h in sizes))
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for w, h in sizes
    ]


@pytest.fixture(scope="module")
def vocab(tiny_model) -> tuple[int, int]:
    """(codebook size, EOS id) of the model: image codes are 0..size-1, and generation ends with EOS."""
    config = json.loads((tiny_model / "vision_language_encoder" / "config.json").read_text())
    return config["vq_config"]["num_embeddings"], config["image_end_token_id"]


def _generate(loop, engine, request):
    return loop.run_until_complete(engine.generate(request))


def _assert_parity(loop, engine, transformers_engine, request):
    """Greedy ids equal and every step's log-probabilities within tolerance; returns the comparison."""
    out, logprobs = loop.run_until_complete(engine.generate_with_logprobs(request, TOP_K))
    ref_tokens, ref_logprobs = reference_logprobs(transformers_engine, request)
    parity = compare(out.generated_token_ids, logprobs, ref_tokens, ref_logprobs)
    assert parity.tokens_equal, parity
    assert parity.max_abs_diff <= FLOAT32_TOLERANCE, parity
    return out


def test_tiny_model_greedy_output_varies_with_position(loop, transformers_engine):
    """Without this the parity below could not see a wrong position: one id everywhere."""
    req = ARGenerationRequest("diverse", PROMPT, ImageSize(512, 512), temperature=0.0)
    out = loop.run_until_complete(transformers_engine.generate(req))
    distinct, share = distinct_share(out.generated_token_ids)
    assert distinct >= MIN_DISTINCT_IDS and share <= MAX_ID_SHARE, (distinct, share)


def test_kv_cache_is_the_configured_size(engine, tiny_model):
    """`kv_cache_memory_bytes` reaches vLLM: its cache holds exactly that many bytes of K and V."""
    text = json.loads((tiny_model / "vision_language_encoder" / "config.json").read_text())["text_config"]
    bytes_per_token = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * text["head_dim"] * 4  # float32
    cache = engine._engine.vllm_config.cache_config
    assert cache.num_gpu_blocks * cache.block_size == KV_CACHE_BYTES // bytes_per_token


# 512x512: preview and target grids of the same shape; the others: different shapes, both ways.
@pytest.mark.parametrize(("width", "height"), [(512, 512), (512, 256), (256, 512)])
def test_t2i_greedy_matches_transformers(loop, engine, transformers_engine, vocab, width, height):
    req = ARGenerationRequest(
        f"t2i-{width}x{height}", PROMPT, ImageSize(width, height), temperature=0.0
    )
    out = _assert_parity(loop, engine, transformers_engine, req)
    ref = loop.run_until_complete(transformers_engine.generate(req))
    layout = token_layout(ImageSize(width, height), image_to_image=False)
    assert len(out.generated_token_ids) == layout.tokens_to_generate
    assert out.generated_token_ids.tolist() == ref.generated_token_ids.tolist()
    assert out.prior_token_ids.shape == (height // 32, width // 32)
    codebook_size, eos = vocab
    assert (
        int(out.generated_token_ids.max()) == eos
        and int(out.generated_token_ids[:-1].max()) < codebook_size
    )


@pytest.mark.parametrize(
    ("condition_sizes", "width", "height"),
    [([(384, 256)], 512, 384), ([(384, 256), (256, 256)], 256, 256)],
    ids=["one-image", "two-images"],
)
def test_i2i_greedy_matches_transformers_engine(
    loop, engine, transformers_engine, condition_sizes, width, height
):
    images = _condition_images(*condition_sizes)
    req = ARGenerationRequest(
        f"i2i-{len(images)}",
        PROMPT,
        ImageSize(width, height),
        condition_images=images,
        temperature=0.0,
    )
    out = _assert_parity(loop, engine, transformers_engine, req)
    ref = loop.run_until_complete(transformers_engine.generate(req))
    layout = token_layout(ImageSize(width, height), image_to_image=True)
    assert len(out.generated_token_ids) == layout.tokens_to_generate
    assert out.generated_token_ids.tolist() == ref.generated_token_ids.tolist()
    assert out.prior_token_ids.tolist() == ref.prior_token_ids.tolist()
    # The condition images' d32 VQ grids (the processor halves the image, patch 16).
    assert [p.shape for p in out.prior_token_image_ids] == [
        (h // 32, w // 32) for w, h in condition_sizes
    ]
    assert [p.tolist() for p in out.prior_token_image_ids] == [
        p.tolist() for p in ref.prior_token_image_ids
    ]


def test_i2i_depends_on_the_condition_image(loop, engine):
    """Different condition pixels give different VQ ids and (here) different tokens: the image is used."""
    a, b = _condition_images((256, 256), (256, 256))
    out_a = _generate(
        loop,
        engine,
        ARGenerationRequest(
            "i2i-a", PROMPT, ImageSize(256, 256), condition_images=[a], temperature=0.0
        ),
    )
    out_b = _generate(
        loop,
        engine,
        ARGenerationRequest(
            "i2i-b", PROMPT, ImageSize(256, 256), condition_images=[b], temperature=0.0
        ),
    )
    assert (
        out_a.prior_token_image_ids[0].tolist()
        != out_b.prior_token_image_ids[0].tolist()
    )
    assert out_a.generated_token_ids.tolist() != out_b.generated_token_ids.tolist()


def test_concurrent_requests_match_solo_runs(loop, engine):
    sizes = [(512, 512), (512, 256), (256, 512), (256, 256), (512, 512), (384, 256)]
    requests = [
        ARGenerationRequest(f"solo-{i}", f"{PROMPT} #{i}", ImageSize(w, h), temperature=0.0)
        for i, (w, h) in enumerate(sizes)
    ]
    # Image-to-image requests in the same batch (one and two condition images).
    requests.append(
        ARGenerationRequest(
            "solo-i2i-1",
            PROMPT,
            ImageSize(width=512, height=384),
            condition_images=_condition_images((256, 384)),
            temperature=0.0,
        )
    )
    requests.append(
        ARGenerationRequest(
            "solo-i2i-2",
            PROMPT,
            ImageSize(256, 256),
            condition_images=_condition_images((384, 256), (256, 256)),
            temperature=0.0,
        )
    )
    solo = [_generate(loop, engine, r).generated_token_ids.tolist() for r in requests]

    async def together():
        batch = [
            ARGenerationRequest(
                f"batch-{r.job_id}",
                r.prompt,
                r.size,
                condition_images=r.condition_images,
                temperature=0.0,
            )
            for r in requests
        ]
        return await asyncio.gather(*(engine.generate(r) for r in batch))

    batched = [
        o.generated_token_ids.tolist() for o in loop.run_until_complete(together())
    ]
    assert batched == solo


def test_seeded_sampling_is_reproducible(loop, engine, vocab):
    a = _generate(
        loop,
        engine,
        ARGenerationRequest("seed-a", PROMPT, ImageSize(256, 256), temperature=0.9, seed=7),
    )
    b = _generate(
        loop,
        engine,
        ARGenerationRequest("seed-b", PROMPT, ImageSize(256, 256), temperature=0.9, seed=7),
    )
    assert a.generated_token_ids.tolist() == b.generated_token_ids.tolist()
    assert int(a.generated_token_ids[:-1].max()) < vocab[0]  # image codes only, before EOS


def test_cancelling_generate_aborts_in_vllm(loop, engine):
    async def run():
        task = asyncio.ensure_future(
            engine.generate(ARGenerationRequest("to-cancel", PROMPT, ImageSize(2048, 2048)))
        )
        # Wait until vLLM holds the request, then cancel the awaiting task.
        while not engine._engine.get_num_unfinished_requests():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # AsyncLLM aborted it: no request is left running in the engine.
        deadline = loop.time() + 30
        while engine._engine.get_num_unfinished_requests() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert engine._engine.get_num_unfinished_requests() == 0

    loop.run_until_complete(run())


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["linear", "grid-start+1"])
def test_parity_check_fails_with_wrong_decode_positions(loop, tiny_model, transformers_engine, broken,
                                                        monkeypatch, tmp_path):
    """The parity check has teeth: vLLM whose model has stock linear decode positions, or its grids
    started one position late, fails it for text-to-image and image-to-image, on requests the
    product model passes (test_t2i_greedy_matches_transformers[512-512],
    test_i2i_greedy_matches_transformers_engine[one-image]).

    The broken models are the product's with one piece replaced (tests/vllm_broken_positions.py).
    vLLM builds the model in its spawned engine-core process, so they get there as a test-only vLLM
    plugin chosen with VLLM_PLUGINS for this engine alone. Were it not loaded there, the engine would
    run the product model and this test would fail (the parity would hold)."""
    from vllm.plugins import load_general_plugins

    from tests.vllm_broken_positions import PLUGINS, write_plugin_dist

    _stop_shared_engine(loop)
    # Plugins load once per process: this one keeps the product's registration, and the variant
    # reaches only the engine's own (spawned) processes.
    load_general_plugins()
    with monkeypatch.context() as patch:
        patch.syspath_prepend(str(write_plugin_dist(tmp_path)))  # spawned processes inherit sys.path
        patch.setenv("VLLM_PLUGINS", PLUGINS[broken])  # the variant's plugin, not the product's
        broken_engine = _start_engine(loop, tiny_model, max_num_seqs=2)
    try:
        requests = [
            ARGenerationRequest(f"broken-t2i-{broken}", PROMPT, ImageSize(256, 256), temperature=0.0),
            ARGenerationRequest(f"broken-i2i-{broken}", PROMPT, ImageSize(512, 384),
                                condition_images=_condition_images((384, 256)), temperature=0.0),
        ]
        for req in requests:
            out, logprobs = loop.run_until_complete(broken_engine.generate_with_logprobs(req, TOP_K))
            parity = compare(out.generated_token_ids, logprobs, *reference_logprobs(transformers_engine, req))
            assert not parity.holds(FLOAT32_TOLERANCE), (req.job_id, parity)
            # Not only the ids: the log-probabilities move far past the tolerance.
            assert parity.max_abs_diff > 10 * FLOAT32_TOLERANCE, (req.job_id, parity)
            # Only the decode positions are broken: the first step, computed by the prefill over
            # the prompt's positions, still agrees.
            assert parity.step_diffs[0] <= FLOAT32_TOLERANCE, (req.job_id, parity.step_diffs[:5])
    finally:
        loop.run_until_complete(broken_engine.shutdown())
