"""Seeds as OpenAI clients expect them, and the exact-repeat result cache.

Two identical calls without a seed give two different images (each with its seed returned, so it
can be reproduced); repeats of a request with an explicit seed are answered from the router's
bounded cache, byte-identical to computing them again.
"""

from __future__ import annotations

import base64

import pytest
from prometheus_client import CollectorRegistry

from harness.local_cluster import generate, image_bytes
from router.core.image_request import GeneratedImage
from router.core.metrics import RouterMetrics
from router.core.result_cache import ResultCache
from common.sizes import ImageSize
from tests.helpers import cluster_with, metric

PROMPT = "a red fox in the snow"
CACHE_BYTES = 8 * 1024 * 1024


def _ok(response):
    assert response.status_code == 200, response.text
    return response


def test_calls_without_a_seed_differ_and_the_returned_seed_reproduces_them(cluster):
    a = _ok(generate(cluster.url, seed=None, prompt=PROMPT, steps=1))
    b = _ok(generate(cluster.url, seed=None, prompt=PROMPT, steps=1))
    assert a.json()["seeds"] != b.json()["seeds"]
    assert image_bytes(a) != image_bytes(b)
    again = _ok(generate(cluster.url, seed=a.json()["seeds"][0], prompt=PROMPT, steps=1))
    assert image_bytes(again) == image_bytes(a)


def test_random_seeds_stay_below_2_53_and_big_client_seeds_come_back_exact(cluster):
    """A drawn seed (and seed + n - 1) fits a float64 exactly, so JavaScript, jq and every JSON reader show the
    seed that reproduces the image; a client's own seed may be larger (up to 2^63 - 1) and is echoed as sent."""
    seeds = []
    for _ in range(4):  # a draw below 2^63 lands below 2^53 once in 1024: four in a row never by chance
        response = _ok(generate(cluster.url, seed=None, prompt=PROMPT, steps=1, n=2))
        body = response.json()
        assert [item["seed"] for item in body["data"]] == body["seeds"]
        assert body["seeds"][1] == body["seeds"][0] + 1
        seeds += body["seeds"]
    assert all(0 <= seed < 2**53 for seed in seeds), seeds
    assert all(int(float(seed)) == seed for seed in seeds)
    big = 2**53 + 1  # 9007199254740993: no float64 holds it
    response = _ok(generate(cluster.url, seed=big, prompt=PROMPT, steps=1))
    assert response.json()["seeds"] == [big]
    assert f"[{big}]" in response.text.replace(" ", "")  # the exact digits on the wire


@pytest.fixture(scope="module")
def cached(tiny_model, tmp_path_factory):
    with cluster_with(tiny_model, tmp_path_factory, "cache", {"router": {"result_cache_bytes": CACHE_BYTES}}) as c:
        yield c


def _cache(cluster, outcome: str) -> float:
    return metric(cluster, f'glm_router_result_cache_lookups_total{{outcome="{outcome}"}}')


def test_a_repeat_with_an_explicit_seed_is_a_hit_identical_to_a_recompute(cached, cluster):
    first = _ok(generate(cached.url, seed=7, prompt=PROMPT, steps=2))
    hits = _cache(cached, "hit")
    repeat = _ok(generate(cached.url, seed=7, prompt=PROMPT, steps=2))
    assert _cache(cached, "hit") == hits + 1
    assert repeat.json()["timings"][0]["cached"] == 1.0
    # The same request computed by a router without a cache (same model and stage config).
    recompute = _ok(generate(cluster.url, seed=7, prompt=PROMPT, steps=2))
    assert image_bytes(repeat) == image_bytes(first) == image_bytes(recompute)


def test_anything_that_changes_the_image_misses(cached):
    _ok(generate(cached.url, seed=8, prompt=PROMPT, steps=2))
    hits = _cache(cached, "hit")
    for change in ({"steps": 1}, {"prompt": PROMPT + "!"}, {"size": "512x256"}, {"output_format": "jpeg"},
                   {"guidance_scale": 2.0}):
        body = {"seed": 8, "prompt": PROMPT, "steps": 2, **change}
        _ok(generate(cached.url, **body))
    assert _cache(cached, "hit") == hits


def test_images_of_n_are_cached_one_by_one_and_random_seeds_are_never_looked_up(cached):
    both = _ok(generate(cached.url, seed=20, prompt=PROMPT, steps=1, n=2))
    hits, misses = _cache(cached, "hit"), _cache(cached, "miss")
    second = _ok(generate(cached.url, seed=21, prompt=PROMPT, steps=1))  # image 1 of the request above
    assert image_bytes(second)[0] == image_bytes(both)[1]
    assert _cache(cached, "hit") == hits + 1
    _ok(generate(cached.url, seed=None, prompt=PROMPT, steps=1))
    assert (_cache(cached, "hit"), _cache(cached, "miss")) == (hits + 1, misses)


def test_a_streamed_hit_completes_with_the_stored_image(cached):
    import httpx

    body = {"prompt": PROMPT, "seed": 30, "num_inference_steps": 1, "size": "256x256"}
    plain = _ok(httpx.post(f"{cached.url}/v1/images/generations", json=body, timeout=120))
    with httpx.stream("POST", f"{cached.url}/v1/images/generations", json={**body, "stream": True}, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    import json

    completed = [json.loads(line[6:]) for line in lines]
    assert [event["type"] for event in completed] == ["image_generation.completed"]
    assert base64.b64decode(completed[0]["b64_json"]) == image_bytes(plain)[0]


def test_the_cache_is_bounded_by_bytes_least_recently_used_out():
    cache = ResultCache(max_bytes=100, metrics=RouterMetrics(CollectorRegistry()))

    def image(size: int) -> GeneratedImage:
        return GeneratedImage(image=b"x" * size, output_format="png", seed=1, size=ImageSize(256, 256),
                              timings={}, stage_sizes={})

    cache.put("a", image(40))
    cache.put("b", image(40))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", image(40))  # over 100 bytes: b goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("huge", image(101))  # larger than the whole cache: not kept
    assert cache.get("huge") is None
    assert not ResultCache(0, RouterMetrics(CollectorRegistry())).enabled
