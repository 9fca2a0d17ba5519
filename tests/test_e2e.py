"""End to end through HTTP on the tiny model: router + AR worker + DiT worker as real processes.

The oracle: the disaggregated result is pixel-identical to diffusers' GlmImagePipeline run in
one process on the same weights with the same seed and size.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import GlmImagePipeline

from common.sizes import ImageSize, SizeLimits, nearest_valid_size
from common.stage_config import load_stage_config
from harness.local_cluster import generate
from tests.helpers import b64_image, chat, cluster_with, data_url, image_part, noise_png, open_image

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
STEPS = 2
TIMEOUT = httpx.Timeout(300.0)
PROMPT = 'a lighthouse, "GLM" painted on it'


def _generate(cluster, seed: int, size: str | None = None, steps: int = STEPS, **body) -> dict:
    """A generation at `size` (None: the router's default) that must succeed; its JSON."""
    response = generate(cluster.url, seed, prompt=PROMPT, size=size, steps=steps, timeout=TIMEOUT, **body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def reference_pipeline(tiny_model, cluster):
    """The in-process reference, run with the workers' math thread count: CPU float reductions
    depend on how many threads split them."""
    threads = int(cluster.env.get("OMP_NUM_THREADS", torch.get_num_threads()))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    pipe = GlmImagePipeline.from_pretrained(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(previous)


# The large sizes cost 10-15 s each on the tiny model: full tier.
@pytest.mark.parametrize("size", ["512x512", "1024x512", "512x1024", pytest.param("768x1344", marks=pytest.mark.slow),
                                  pytest.param("1024x1024", marks=pytest.mark.slow)])
def test_text_to_image_at_each_size_reaches_every_stage(cluster, size):
    width, height = map(int, size.split("x"))
    data = _generate(cluster, size=size, seed=11)
    image = b64_image(data["data"][0]["b64_json"])
    assert image.size == (width, height)
    assert image.format == "PNG"
    # Each stage reported the size it used: the requested one.
    assert data["stage_sizes"][0] == {"ar": [height, width], "dit": [height, width]}
    assert data["size"] == size


def test_default_size_is_propagated_like_an_explicit_one(cluster):
    default = load_stage_config(cluster.stage_config).limits.default_size
    assert default != "1024x1024"  # not the pipeline's own default: a stage that ignored the size would show
    width, height = map(int, default.split("x"))
    data = _generate(cluster, seed=3)
    assert data["size"] == default
    assert data["stage_sizes"][0] == {"ar": [height, width], "dit": [height, width]}
    assert b64_image(data["data"][0]["b64_json"]).size == (width, height)


@pytest.mark.slow
def test_the_released_default_size_reaches_every_stage(tiny_model, tmp_path_factory):
    """The tiny config defaults to a small size to keep the suite fast; the released configs'
    default (1024x1024) is propagated all the same, once, by a cluster that uses it."""
    released = load_stage_config(ROOT / "stage_configs" / "glm_image.yaml").limits.default_size
    assert released == "1024x1024"
    with cluster_with(tiny_model, tmp_path_factory, "released-default", {"limits": {"default_size": released}}) as c:
        data = _generate(c, seed=3, steps=1)
    width, height = map(int, released.split("x"))
    assert data["size"] == released
    assert data["stage_sizes"][0] == {"ar": [height, width], "dit": [height, width]}
    assert b64_image(data["data"][0]["b64_json"]).size == (width, height)


def _assert_served_equals_pipeline(cluster, pipe: GlmImagePipeline, size: tuple[int, int], cond: list[bytes]) -> None:
    w, h = size
    expected = pipe(
        prompt=PROMPT,
        image=[open_image(c).convert("RGB") for c in cond] or None,
        height=h,
        width=w,
        num_inference_steps=STEPS,
        guidance_scale=1.5,
        generator=torch.Generator().manual_seed(21),
    ).images[0]
    if cond:
        files = [("image", ("c.png", c, "image/png")) for c in cond]
        form = {"prompt": PROMPT, "size": f"{w}x{h}", "seed": "21", "num_inference_steps": str(STEPS)}
        response = httpx.post(f"{cluster.url}/v1/images/edits", data=form, files=files, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        got = b64_image(response.json()["data"][0]["b64_json"])
    else:
        got = b64_image(_generate(cluster, size=f"{w}x{h}", seed=21)["data"][0]["b64_json"])
    assert got.size == expected.size
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(expected.convert("RGB")))


ORACLE_CASES = [((512, 256), []), ((256, 256), [noise_png(320, 256, seed=1)])]


def test_matches_glm_image_pipeline_in_one_process(cluster, reference_pipeline):
    """The oracle, for text-to-image and image-to-image."""
    for size, cond in ORACLE_CASES:
        _assert_served_equals_pipeline(cluster, reference_pipeline, size, cond)


BFLOAT16 = {"stage_args": [{"engine_args": {"dtype": "bfloat16"}}, {"engine_args": {"dtype": "bfloat16"}}]}


@pytest.mark.slow
def test_bfloat16_serving_matches_glm_image_pipeline_in_bfloat16(tiny_model, tmp_path_factory):
    """The oracle with both workers in bfloat16, as the GPU configs serve (here on the tiny
    model: tests/test_real_shape.py explains why not at the released shapes on CPU)."""
    with cluster_with(tiny_model, tmp_path_factory, "bfloat16", BFLOAT16) as c:
        threads = int(c.env.get("OMP_NUM_THREADS", torch.get_num_threads()))
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            pipe = GlmImagePipeline.from_pretrained(str(tiny_model), dtype=torch.bfloat16)
            pipe.set_progress_bar_config(disable=True)
            assert pipe.transformer.dtype == torch.bfloat16
            for size, cond in ORACLE_CASES:
                _assert_served_equals_pipeline(c, pipe, size, cond)
        finally:
            torch.set_num_threads(previous)


def test_same_seed_same_bytes_and_n_gives_distinct_images(cluster):
    first = _generate(cluster, size="256x256", seed=5, n=2)
    again = _generate(cluster, size="256x256", seed=5)
    assert first["seeds"] == [5, 6]
    a, b = (d["b64_json"] for d in first["data"])
    assert a != b
    assert again["data"][0]["b64_json"] == a


@pytest.mark.parametrize("n_images", [1, 2])
def test_image_to_image_with_condition_images(cluster, n_images):
    files = [("image[]", (f"c{i}.png", noise_png(384 + 64 * i, 256, seed=i), "image/png")) for i in range(n_images)]
    form = {"prompt": "make it night", "size": "256x512", "seed": "2", "num_inference_steps": str(STEPS)}
    response = httpx.post(f"{cluster.url}/v1/images/edits", data=form, files=files, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    data = response.json()
    assert b64_image(data["data"][0]["b64_json"]).size == (256, 512)
    assert data["stage_sizes"][0] == {"ar": [512, 256], "dit": [512, 256]}


def test_edit_size_auto_uses_the_first_image_made_valid(cluster):
    files = [("image", ("c.png", noise_png(300, 250, seed=9), "image/png"))]
    response = httpx.post(f"{cluster.url}/v1/images/edits", data={"prompt": "x", "size": "auto", "num_inference_steps": str(STEPS)}, files=files, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    # 250 is under the 256 minimum: scaled up to 307x256, then to multiples of 32.
    assert nearest_valid_size(ImageSize(300, 250), SizeLimits()) == ImageSize(320, 256)
    assert b64_image(response.json()["data"][0]["b64_json"]).size == (320, 256)


def test_chat_completions_text_and_image_with_extra_body(cluster):
    body = chat("a red fox", extra_body={"height": 256, "width": 512, "num_inference_steps": STEPS, "guidance_scale": 1.5, "seed": 4})
    response = httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    url = response.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert b64_image(url.split(",", 1)[1]).size == (512, 256)

    content = [{"type": "text", "text": "as a watercolor"}, image_part(data_url(noise_png(256, 256, seed=3)))]
    body = chat(content, height=256, width=256, num_inference_steps=STEPS)
    response = httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    url = response.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]
    assert b64_image(url.split(",", 1)[1]).size == (256, 256)


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(cluster, fmt, pil):
    data = _generate(cluster, size="256x256", seed=1, output_format=fmt)
    assert b64_image(data["data"][0]["b64_json"]).format == pil


def test_bad_input_gets_a_4xx_that_names_the_problem_and_the_server_keeps_serving(cluster):
    url = f"{cluster.url}/v1/images/generations"
    cases = [
        ({"json": {"prompt": "x", "size": "1000x1000"}}, 400, "nearest valid size is 992x992"),
        ({"json": {"prompt": "x", "size": "1328x1328"}}, 400, "multiples of 32"),
        ({"json": {"size": "512x512"}}, 400, "prompt"),
        ({"json": {"prompt": "x", "n": 11}}, 400, "n"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ]
    for kwargs, status, words in cases:
        response = httpx.post(url, timeout=TIMEOUT, **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        assert words in response.json()["error"]["message"], response.text
    bad_b64 = chat([{"type": "text", "text": "x"}, image_part("data:image/png;base64,@@@")])
    response = httpx.post(f"{cluster.url}/v1/chat/completions", json=bad_b64, timeout=TIMEOUT)
    assert response.status_code == 400 and "base64" in response.text
    files = [("image", ("c.png", b"definitely not an image", "image/png"))]
    response = httpx.post(f"{cluster.url}/v1/images/edits", data={"prompt": "x"}, files=files, timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    assert httpx.get(f"{cluster.url}/health").status_code == 200
    assert _generate(cluster, size="256x256", seed=1)["data"]


def test_models_ready_and_metrics(cluster):
    models = httpx.get(f"{cluster.url}/v1/models").json()
    assert models["data"][0]["id"] == cluster.model_name
    ready = httpx.get(f"{cluster.url}/ready")
    assert ready.status_code == 200 and ready.json()["live_workers"] == {"ar": 1, "dit": 1}
    metrics = httpx.get(f"{cluster.url}/metrics").text
    assert 'glm_router_live_workers{stage="ar"} 1.0' in metrics
    assert "glm_router_images_total" in metrics
