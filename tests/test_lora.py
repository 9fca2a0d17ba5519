"""LoRA adapters on the DiT (docs/lora.md), on the tiny model with adapters made by PEFT here.

One cluster for the module (a router with an API key, one AR and two DiT workers that serve
metrics, `max_loras` 2): served adapter images equal diffusers' GlmImagePipeline in one process with
the same adapters at the same scales, adapters compose, a base request keeps its bytes after
adapters were loaded, adapters go where they are warm, workers evict least recently used adapters,
adapters are loaded and unloaded at runtime, and every refusal is a 4xx with a message before a
worker reads anything. The cheap unit checks (file inspection, registry, cache key, protocol) run
without the cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.lora import LoraError, check_targets, find_adapters, inspect_file, resolve_path, target_table
from common.protocol import DiTJob, LoraSpec, OriginalPrompt, decode, encode
from common.stage_config import LoraSettings
from harness.local_cluster import generate, image_bytes
from model_presets.tiny_lora import LoraRecipe, make_loras
from router.core.errors import InvalidRequest, NotFound
from router.core.lora_registry import LoraChoice, LoraRegistry, LoraUpdatesDisabled
from router.core.result_cache import result_key
from tests.helpers import (assert_router_unhurt, b64_image, chat, cluster_with, noise_png, open_image,
                           write_peft_folder)

pytestmark = [
    pytest.mark.quick,
    # The in-process oracle holds two adapters at once, which PEFT warns about (it is what we want).
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
]

STEPS = 2
SIZE = (256, 256)
SEED = 21
PROMPT = 'a lighthouse, "GLM" painted on it'
API_KEY = "lora-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT = httpx.Timeout(120.0)
MAX_RANK = 8
# The tiny DiT's linear layers (what its workers announce): the unit checks use them without a worker.
TINY_LINEARS = [("transformer_blocks.0.attn1.to_q", 16, 16), ("transformer_blocks.0.attn1.to_k", 16, 16),
                ("transformer_blocks.0.attn1.to_v", 16, 16), ("transformer_blocks.0.attn1.to_out.0", 16, 16),
                ("transformer_blocks.0.ff.net.2", 64, 16), ("proj_out", 16, 16)]


# ---------------------------------------------------------------------------
# Adapters


@pytest.fixture(scope="module")
def lora_dir(tiny_model, tmp_path_factory) -> Path:
    """The adapter folder: a..g served by name; staging/ (not listed) for runtime loads; rejects/
    for the refusals; and a valid adapter outside the folder."""
    root = tmp_path_factory.mktemp("lora")
    folder = root / "adapters"
    attention = ("to_q", "to_k", "to_v", "to_out.0")
    recipes = [LoraRecipe(folder / "a.safetensors", rank=4, seed=1, targets=attention),
               LoraRecipe(folder / "b" / "adapter_model.safetensors", rank=2, seed=2, targets=("to_q", "ff.net.2")),
               *(LoraRecipe(folder / f"{name}.safetensors", rank=2, seed=10 + i, targets=("to_v",))
                 for i, name in enumerate("cdefg")),
               LoraRecipe(folder / "staging" / "hot.safetensors", rank=4, seed=5, targets=attention),
               LoraRecipe(folder / "rejects" / "big.safetensors", rank=MAX_RANK * 2, seed=6, targets=("to_q",)),
               LoraRecipe(root / "outside.safetensors", rank=2, seed=7, targets=("to_q",))]
    make_loras(tiny_model, recipes)
    a = load_file(str(folder / "a.safetensors"))
    # Layers the DiT does not have (block 7 of 1), shapes it does not have, keys that are no LoRA.
    save_file({k.replace("blocks.0.", "blocks.7."): v for k, v in a.items()}, str(folder / "rejects" / "no_block.safetensors"))
    save_file({k: (torch.zeros(v.shape[0], 20) if "to_q.lora_A" in k else v) for k, v in a.items()},
              str(folder / "rejects" / "wrong_shape.safetensors"))
    save_file({"transformer.proj_out.weight": torch.zeros(16, 16)}, str(folder / "rejects" / "not_lora.safetensors"))
    torch.save(a, folder / "rejects" / "pickled.bin")
    return folder


@pytest.fixture(scope="module")
def served(tiny_model, lora_dir, tmp_path_factory):
    """The cluster, and the base image (seed SEED) it made before any adapter was loaded."""
    overrides = {"lora": {"dir": str(lora_dir), "max_loras": 2, "max_rank": MAX_RANK, "runtime_updates": True}}
    with cluster_with(tiny_model, tmp_path_factory, "lora-cluster", overrides, num_dit=2, worker_metrics=True,
                      api_keys=(API_KEY,)) as cluster:
        yield cluster, _image(cluster)  # a DiT worker that never loaded an adapter made it


@pytest.fixture(scope="module")
def reference(tiny_model, lora_dir, served):
    """GlmImagePipeline in this process with adapters a and b loaded, at the workers' thread count."""
    from diffusers import GlmImagePipeline

    cluster, _ = served
    previous = torch.get_num_threads()
    torch.set_num_threads(int(cluster.env.get("OMP_NUM_THREADS", previous)))
    pipe = GlmImagePipeline.from_pretrained(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.load_lora_adapter(str(lora_dir), weight_name="a.safetensors", prefix="transformer", adapter_name="a")
    pipe.transformer.load_lora_adapter(str(lora_dir / "b"), weight_name="adapter_model.safetensors",
                                       prefix="transformer", adapter_name="b")
    yield pipe
    torch.set_num_threads(previous)


def _image(cluster, **body) -> bytes:
    response = generate(cluster.url, SEED, prompt=PROMPT, size="x".join(map(str, SIZE)), steps=STEPS, headers=AUTH,
                        timeout=120, **body)
    assert response.status_code == 200, response.text
    return image_bytes(response)[0]


def _pipeline_image(pipe, adapters: dict[str, float], condition: bytes | None = None) -> np.ndarray:
    if adapters:
        pipe.transformer.enable_lora()
        pipe.transformer.set_adapters(list(adapters), list(adapters.values()))
    else:
        pipe.transformer.disable_lora()
    image = pipe(prompt=PROMPT, image=[open_image(condition).convert("RGB")] if condition else None, height=SIZE[1],
                 width=SIZE[0], num_inference_steps=STEPS, guidance_scale=1.5,
                 generator=torch.Generator().manual_seed(SEED)).images[0]
    return np.asarray(image.convert("RGB"))


def _pixels(raw: bytes) -> np.ndarray:
    return np.asarray(open_image(raw).convert("RGB"))


def _worker_metric(cluster, worker: str, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{cluster.metrics_ports[worker]}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _dit_metric(cluster, name: str) -> float:
    return sum(_worker_metric(cluster, worker, name) for worker in ("dit-0", "dit-1"))


def _post(cluster, path: str, body: dict, headers: dict | None = AUTH) -> httpx.Response:
    return httpx.post(f"{cluster.url}{path}", json=body, headers=headers, timeout=TIMEOUT)


# ---------------------------------------------------------------------------
# Served through the cluster


def test_models_lists_each_adapter_with_the_base_as_parent(served):
    cluster, _ = served
    cards = httpx.get(f"{cluster.url}/v1/models", headers=AUTH, timeout=10).json()["data"]
    base = cards[0]["id"]
    assert base == cluster.model_name and cards[0]["parent"] is None
    adapters = {card["id"]: card for card in cards[1:]}
    assert set(adapters) == set("abcdefg")  # staging/ and rejects/ hold no adapter of their own
    assert all(card["parent"] == base for card in adapters.values())
    assert adapters["b"]["root"] == "b/adapter_model.safetensors"


def test_adapter_images_equal_the_pipeline_with_the_same_adapters(served, reference):
    """The oracle, extended: one adapter by `model` (scale 1) and by `loras` (0.8), two composed,
    and the chat endpoint with `loras` in extra_body."""
    cluster, base = served
    by_model = _image(cluster, model="a")
    np.testing.assert_array_equal(_pixels(by_model), _pipeline_image(reference, {"a": 1.0}))
    both = _image(cluster, loras=[{"name": "a", "scale": 0.8}, {"name": "b", "scale": 0.5}])
    np.testing.assert_array_equal(_pixels(both), _pipeline_image(reference, {"a": 0.8, "b": 0.5}))
    assert len({base, by_model, both}) == 3  # adapters change the image

    body = chat(PROMPT, extra_body={"width": SIZE[0], "height": SIZE[1], "num_inference_steps": STEPS, "seed": SEED,
                                    "loras": [{"name": "a", "scale": 0.8}, {"name": "b", "scale": 0.5}]})
    response = _post(cluster, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    url = response.json()["choices"][0]["message"]["content"][0]["image_url"]["url"]
    np.testing.assert_array_equal(np.asarray(b64_image(url.split(",", 1)[1]).convert("RGB")), _pixels(both))


def test_edit_with_an_adapter_equals_the_pipeline(served, reference):
    cluster, _ = served
    condition = noise_png(*SIZE, seed=3)
    form = {"prompt": PROMPT, "size": "x".join(map(str, SIZE)), "seed": str(SEED), "num_inference_steps": str(STEPS),
            "loras": json.dumps([{"name": "b", "scale": 0.7}])}
    response = httpx.post(f"{cluster.url}/v1/images/edits", data=form, files=[("image", ("c.png", condition, "image/png"))],
                          headers=AUTH, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(_pixels(image_bytes(response)[0]), _pipeline_image(reference, {"b": 0.7}, condition))


def test_streamed_with_an_adapter(served):
    """Previews come from the adapted model; the final image arrives as unstreamed ones do."""
    cluster, _ = served
    body = {"prompt": PROMPT, "size": "256x256", "seed": SEED, "num_inference_steps": 3, "loras": [{"name": "a"}],
            "stream": True, "partial_images": 1}
    with httpx.stream("POST", f"{cluster.url}/v1/images/generations", json=body, headers=AUTH, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    kinds = [event["type"] for event in events]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"], kinds
    assert b64_image(events[-1]["b64_json"]).size == SIZE


def test_requests_for_a_warm_adapter_go_to_the_worker_that_has_it(served):
    cluster, _ = served
    loads = _dit_metric(cluster, 'glm_worker_lora_loads_total{outcome="ok"')
    assert _image(cluster, model="c") == _image(cluster, model="c")
    # One load in all: the second request went where c was loaded (picked in turn, it would not have).
    assert _dit_metric(cluster, 'glm_worker_lora_loads_total{outcome="ok"') == loads + 1


def test_workers_evict_the_least_recently_used_adapter_beyond_max_loras(served):
    cluster, _ = served
    first_d = _image(cluster, model="d")
    _image(cluster, loras=[{"name": "e"}, {"name": "f"}])
    for worker in ("dit-0", "dit-1"):
        loaded = _worker_metric(cluster, worker, "glm_worker_loras_loaded")
        loads = _worker_metric(cluster, worker, 'glm_worker_lora_loads_total{outcome="ok"')
        evictions = _worker_metric(cluster, worker, "glm_worker_lora_evictions_total")
        assert loaded <= 2 and loads - evictions == loaded, (worker, loaded, loads, evictions)
    # a..f are 6 adapters on 2 workers of 2 slots each.
    assert _dit_metric(cluster, "glm_worker_lora_evictions_total") >= 2
    assert _dit_metric(cluster, "glm_worker_lora_load_duration_seconds_count") >= 6
    assert _image(cluster, model="d") == first_d  # reloaded or still warm: the same bytes


def test_base_requests_keep_their_bytes_after_adapters_were_loaded(served):
    cluster, base = served
    # Two requests: the DiT workers are picked in turn, and both have adapters loaded by now.
    assert [_image(cluster), _image(cluster)] == [base, base]
    assert all(_worker_metric(cluster, w, "glm_worker_loras_loaded") > 0 for w in ("dit-0", "dit-1"))


def test_load_and_unload_an_adapter_at_runtime(served):
    cluster, base = served
    body = {"lora_name": "hot", "lora_path": "staging/hot.safetensors"}
    assert _post(cluster, "/v1/load_lora_adapter", body, headers=None).status_code == 401  # behind the API key
    response = _post(cluster, "/v1/load_lora_adapter", body)
    assert response.status_code == 200 and "hot" in response.text, response.text
    assert _post(cluster, "/v1/load_lora_adapter", body).status_code == 400  # already loaded
    models = [card["id"] for card in httpx.get(f"{cluster.url}/v1/models", headers=AUTH).json()["data"]]
    assert "hot" in models
    hot = _image(cluster, model="hot")
    assert hot != base
    response = _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "hot"})
    assert response.status_code == 200, response.text
    response = generate(cluster.url, SEED, headers=AUTH, model="hot")
    assert response.status_code == 404 and "hot" in response.text and "'a'" not in response.text
    assert "a, b, c" in response.text  # names what exists
    assert _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "hot"}).status_code == 404
    # A folder adapter unloaded is hidden until loaded again.
    assert _post(cluster, "/v1/unload_lora_adapter", {"lora_name": "g"}).status_code == 200
    assert generate(cluster.url, SEED, headers=AUTH, model="g").status_code == 404
    assert _post(cluster, "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": "g.safetensors"}).status_code == 200


@pytest.mark.parametrize("path,message", [
    ("../outside.safetensors", "outside the adapter folder"),
    ("OUTSIDE", "outside the adapter folder"),
    ("rejects/pickled.bin", "pickle"),
    ("rejects/big.safetensors", f"exceeds the limit of {MAX_RANK}"),
    ("rejects/no_block.safetensors", "transformer_blocks.7.attn1.to_q' is not a linear layer of the DiT"),
    ("rejects/wrong_shape.safetensors", "is 20->16 in the adapter but 16->16 in the DiT"),
    ("rejects/not_lora.safetensors", "is not a LoRA weight"),
    ("rejects/missing.safetensors", "does not exist"),
    ("rejects", "a folder without"),
])
def test_a_bad_adapter_file_is_a_400_before_any_worker_reads_it(served, lora_dir, path, message):
    cluster, _ = served
    if path == "OUTSIDE":
        path = str(lora_dir.parent / "outside.safetensors")
    response = _post(cluster, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": path})
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


@pytest.mark.parametrize("body,status,message", [
    ({"model": "nope"}, 404, "LoRA adapters: a, b"),
    ({"loras": [{"name": "nope"}]}, 404, "served adapters: a, b"),
    ({"loras": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}, 400, "at most 2 per request"),
    ({"loras": [{"name": "a"}, {"name": "a", "scale": 0.5}]}, 400, "named twice"),
    ({"loras": [{"name": "a", "scale": 1e9}]}, 400, "loras.0.scale"),
    ({"loras": [{"name": "a", "weight": 1}]}, 400, "unknown field 'loras.0.weight'"),
])
def test_a_bad_adapter_choice_is_a_4xx_naming_the_problem(served, body, status, message):
    cluster, _ = served
    response = generate(cluster.url, SEED, headers=AUTH, **body)
    assert response.status_code == status and message in response.json()["error"]["message"], response.text


def test_bad_names_and_the_workers_unhurt(served):
    cluster, _ = served
    for name in ("../x", "", cluster.model_name):
        response = _post(cluster, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "a.safetensors"})
        assert response.status_code == 400, response.text
    form = {"prompt": PROMPT, "loras": "not json"}
    response = httpx.post(f"{cluster.url}/v1/images/edits", data=form, files=[("image", ("c.png", noise_png(256, 256), "image/png"))],
                          headers=AUTH, timeout=TIMEOUT)
    assert response.status_code == 400 and "JSON list" in response.text
    # Nothing reached a worker: no load failed, and both still serve.
    assert _dit_metric(cluster, 'glm_worker_lora_loads_total{outcome="failed"') == 0
    assert _dit_metric(cluster, 'glm_worker_jobs_total{stage="dit",worker_id="dit-0",outcome="bad_request"') == 0
    assert_router_unhurt(cluster)


# ---------------------------------------------------------------------------
# Unit checks, no cluster


def test_inspection_and_targets_without_a_worker(lora_dir):
    table = target_table(TINY_LINEARS)
    a = inspect_file(lora_dir, "a.safetensors", MAX_RANK, 1 << 20)
    assert (a.prefix, a.rank, len(a.modules), len(a.digest)) == ("transformer", 4, 4, 64)
    check_targets(a, table, "a")
    with pytest.raises(LoraError, match="at most 1000 are accepted"):
        inspect_file(lora_dir, "a.safetensors", MAX_RANK, 1000)
    with pytest.raises(LoraError, match="outside"):
        resolve_path(lora_dir, "b/../../outside.safetensors")
    (lora_dir.parent / "link.safetensors").symlink_to(lora_dir.parent / "outside.safetensors")
    (lora_dir / "rejects" / "link.safetensors").symlink_to(lora_dir.parent / "link.safetensors")
    with pytest.raises(LoraError, match="outside"):  # a symlink out is followed before the check
        resolve_path(lora_dir, "rejects/link.safetensors")
    assert find_adapters(lora_dir)["b"] == "b/adapter_model.safetensors"
    loop = lora_dir.parent / "loop"
    loop.mkdir()
    (loop / "x.safetensors").symlink_to(loop / "y.safetensors")
    (loop / "y.safetensors").symlink_to(loop / "x.safetensors")
    assert find_adapters(loop) == {}
    for bad in ("x.safetensors", "n" * 300 + ".safetensors"):
        with pytest.raises(LoraError, match="cannot be read"):
            resolve_path(loop, bad)
    peft_folder = lora_dir.parent / "peft" / "scaled"
    peft_folder.mkdir(parents=True)
    (peft_folder / "adapter_model.safetensors").write_bytes((lora_dir / "a.safetensors").read_bytes())
    digests = set()
    for config in ({"r": 4, "lora_alpha": 8}, {"r": 4, "lora_alpha": 4, "use_rslora": True},
                   {"r": 4, "lora_alpha": 4, "alpha_pattern": {"to_q": 2}}):
        (peft_folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
        scaled = inspect_file(peft_folder.parent, "scaled", MAX_RANK, 1 << 20)
        assert scaled.rank == 4 and scaled.peft_scaling.lora_alpha == config["lora_alpha"]
        digests.add(scaled.digest)
    # The config is part of the adapter's identity: the same weights under another alpha are another adapter.
    assert len(digests) == 3 and inspect_file(lora_dir, "a.safetensors", MAX_RANK, 1 << 20).digest not in digests
    for config, message in [({"use_dora": True}, "use_dora"), ({"peft_type": "LOHA"}, "peft_type LOHA"),
                            ({"lora_alpha": "8"}, "lora_alpha in its adapter_config.json must be a positive number"),
                            ({"alpha_pattern": {"to_q": -1}}, r"alpha_pattern\[.to_q.\] in")]:
        (peft_folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, **config}))
        with pytest.raises(LoraError, match=message):
            inspect_file(peft_folder.parent, "scaled", MAX_RANK, 1 << 20)
    truncated = lora_dir.parent / "truncated"
    truncated.mkdir()
    (truncated / "t.safetensors").write_bytes((lora_dir / "a.safetensors").read_bytes()[:50])
    with pytest.raises(LoraError, match="not a safetensors file"):
        inspect_file(truncated, "t.safetensors", MAX_RANK, 1 << 20)


def test_peft_and_bare_layouts_give_the_diffusers_layouts_image(tiny_model, lora_dir, tmp_path):
    """The same weights saved with PEFT's key prefix (a PEFT folder) or none load like diffusers' file."""
    import threading

    from bench.dit_speedups import make_job
    from common.sizes import ImageSize
    from common.stage_config import DiTEngineArgs
    from stage_dit.pipeline_runner import DiTPipelineRunner

    weights = load_file(str(lora_dir / "a.safetensors"))
    (tmp_path / "peft").mkdir()
    save_file({k.replace("transformer.", "base_model.model.", 1): v for k, v in weights.items()},
              str(tmp_path / "peft" / "adapter_model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in weights.items()}, str(tmp_path / "bare.safetensors"))
    (tmp_path / "a.safetensors").write_bytes((lora_dir / "a.safetensors").read_bytes())
    runner = DiTPipelineRunner(tiny_model, DiTEngineArgs(dtype="float32"), lora=LoraSettings(dir=str(tmp_path)))
    job = make_job(ImageSize(*SIZE), 1, codebook=128)
    images = []
    for path in ("a.safetensors", "peft", "bare.safetensors"):
        lora = inspect_file(tmp_path, path, MAX_RANK, 1 << 20)
        spec = LoraSpec(name="x", path=lora.relative, digest=lora.digest, scale=0.8)
        images.append(runner.run(job.model_copy(update={"loras": [spec]}), threading.Event()).image)
    assert images[0] == images[1] == images[2]
    assert runner.run(job, threading.Event()).image != images[0]


def test_peft_folders_are_scaled_by_their_alpha(tiny_model, lora_dir, tmp_path):
    """A PEFT folder's alpha (lora_alpha, rsLoRA, alpha_pattern) scales its modules as PEFT does:
    equal, to the bit, to diffusers' file with the scaling folded into lora_B (powers of two, which
    multiply exactly)."""
    import threading

    from bench.dit_speedups import make_job
    from common.sizes import ImageSize
    from common.stage_config import DiTEngineArgs
    from stage_dit.pipeline_runner import DiTPipelineRunner

    weights = load_file(str(lora_dir / "a.safetensors"))  # rank 4 on to_q, to_k, to_v and to_out.0
    write_peft_folder(tmp_path / "alpha", weights, r=4, lora_alpha=8)  # 8 / 4
    write_peft_folder(tmp_path / "rslora", weights, r=4, lora_alpha=4, use_rslora=True)  # 4 / sqrt(4)
    write_peft_folder(tmp_path / "pattern", weights, r=4, lora_alpha=4, alpha_pattern={"to_q": 16})  # 4 on to_q, else 1

    def folded(name: str, factor) -> None:
        save_file({k: v * factor(k) if ".lora_B." in k else v for k, v in weights.items()},
                  str(tmp_path / f"{name}.safetensors"))

    folded("twice", lambda key: 2)
    folded("query_x4", lambda key: 4 if ".to_q." in key else 1)
    (tmp_path / "a.safetensors").write_bytes((lora_dir / "a.safetensors").read_bytes())
    runner = DiTPipelineRunner(tiny_model, DiTEngineArgs(dtype="float32"), lora=LoraSettings(dir=str(tmp_path)))
    job = make_job(ImageSize(*SIZE), 1, codebook=128)

    def image(path: str) -> bytes:
        lora = inspect_file(tmp_path, path, MAX_RANK, 1 << 20)
        spec = LoraSpec(name="x", path=lora.relative, digest=lora.digest, scale=0.5)
        return runner.run(job.model_copy(update={"loras": [spec]}), threading.Event()).image

    twice = image("twice.safetensors")
    assert image("alpha") == image("rslora") == twice != image("a.safetensors")
    assert image("pattern") == image("query_x4.safetensors") not in (twice, image("a.safetensors"))


def test_registry_refuses_runtime_updates_when_disabled(lora_dir):
    registry = LoraRegistry(LoraSettings(dir=str(lora_dir)), "base")
    with pytest.raises(LoraUpdatesDisabled) as refused:
        registry.load("x", "staging/hot.safetensors", "t")
    assert refused.value.status_code == 403
    spec, = registry.resolve([LoraChoice("a", 0.5)])
    assert (spec.path, spec.scale) == ("a.safetensors", 0.5)
    with pytest.raises(NotFound):
        registry.resolve([LoraChoice("staging")])
    with pytest.raises(InvalidRequest, match="serves no LoRA"):
        LoraRegistry(LoraSettings(), "base").resolve([LoraChoice("a")])


def test_result_cache_key_and_protocol_carry_the_adapters():
    original = OriginalPrompt(prompt="p", height=256, width=256, seed=1, num_inference_steps=2, guidance_scale=1.5)
    spec = LoraSpec(name="a", path="a.safetensors", digest="0" * 64, scale=0.8)
    plain = result_key(original, 0.9, 0.75, 16, "m", "f")
    keys = {plain, result_key(original, 0.9, 0.75, 16, "m", "f", (spec,)),
            result_key(original, 0.9, 0.75, 16, "m", "f", (spec.model_copy(update={"scale": 0.5}),)),
            result_key(original, 0.9, 0.75, 16, "m", "f", (spec.model_copy(update={"digest": "1" * 64}),))}
    assert len(keys) == 4
    assert result_key(original, 0.9, 0.75, 16, "m", "f", (spec.model_copy(update={"name": "b"}),)) in keys
    job = DiTJob(original_prompt=original, prior_token_ids=np.zeros((8, 8), dtype=np.int64), loras=[spec])
    assert _roundtrip(job).loras == [spec]


def _wrap(job: DiTJob):
    from common.protocol import JobRequest

    return JobRequest(job_id="r.0.dit.0", request_id="r", deadline_s=10, payload=job)


def _roundtrip(job: DiTJob) -> DiTJob:
    return decode(encode(_wrap(job))).payload
