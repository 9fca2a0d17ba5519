"""The vLLM AR engine against transformers' GlmImageForConditionalGeneration.generate.

Greedy decoding must give the same tokens, token for token, as transformers with a
mask that allows only image codes at grid positions and EOS at the last one; for
image-to-image also the condition images' VQ ids (`prior_token_image_ids`), against
the transformers engine (`TransformersAREngine`).
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

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(tiny_model, loop):
    from stage_ar.vllm_engine import VllmAREngine

    async def start():
        # float32 like the transformers reference, so greedy argmaxes agree exactly.
        args = AREngineArgs(
            dtype="float32",
            max_num_seqs=16,
            gpu_memory_utilization=0.15,
            enforce_eager=True,
        )
        return VllmAREngine(tiny_model, args, "cpu")

    eng = loop.run_until_complete(start())
    yield eng
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


@pytest.mark.parametrize(("width", "height"), [(512, 512), (1024, 512), (512, 1024)])
def test_t2i_greedy_matches_transformers(loop, engine, transformers_engine, vocab, width, height):
    req = ARGenerationRequest(
        f"t2i-{width}x{height}", PROMPT, ImageSize(width, height), temperature=0.0
    )
    out = _generate(loop, engine, req)
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
    out = _generate(loop, engine, req)
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
    sizes = [(512, 512), (1024, 512), (512, 1024), (256, 256), (512, 512), (768, 512)]
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
        ARGenerationRequest("seed-a", PROMPT, ImageSize(512, 512), temperature=0.9, seed=7),
    )
    b = _generate(
        loop,
        engine,
        ARGenerationRequest("seed-b", PROMPT, ImageSize(512, 512), temperature=0.9, seed=7),
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
