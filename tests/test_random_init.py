"""The full-size preset without weights, random weights made on the worker's device, and the GPU check's logic.

- `build-model --preset full-size` writes the released configuration at full depth as configs,
  tokenizers and processor only; AutoConfig / AutoProcessor / diffusers read them, and the modules
  built from them on the meta device have the released parameter counts (the decoder's checked
  against a count by hand from the published widths);
- random init is never the default: a folder with weights loads them, one without weights is refused
  unless it was written without weights on purpose or `--random-init` is given; the served name and
  the workers' logs say it;
- the random-init modules are built on the device in the stage's dtype, seeded (every worker makes
  the same weights);
- slow tier: a weightless tiny folder served by the real launcher; the vLLM engine's
  `load_format: dummy` path; `bench/gpu_check.sh --device cpu --depth small` end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from harness.local_cluster import free_port
from launch.cli import build_parser
from model_presets import random_init
from model_presets.tiny_model import BUILD_SEED, build_model_configs, build_tiny_model

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
TINY_STAGE_CONFIG = ROOT / "stage_configs" / "glm_image_tiny_cpu.yaml"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> Path:
    """The full-size folder, configs only (~5 s, ~9 MB: the 168064-token tokenizer)."""
    return build_model_configs(tmp_path_factory.mktemp("full") / "full-size", preset="full-size")


@pytest.fixture(scope="module")
def tiny_random(tmp_path_factory) -> Path:
    return build_model_configs(tmp_path_factory.mktemp("tiny-random") / "tiny", preset="tiny")


@pytest.fixture(autouse=True)
def _no_random_init_env(monkeypatch):
    monkeypatch.delenv(random_init.RANDOM_INIT_ENV, raising=False)


def test_full_size_configs_load_with_the_auto_classes(full_size):
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    assert not [p for p in full_size.rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    assert random_init.folder_is_random_init(full_size)
    config = AutoConfig.from_pretrained(str(full_size / "vision_language_encoder"))
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (40, 4096, 13696)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (32, 2, 128)
    assert (text.vocab_size, text.vision_vocab_size) == (168064, 16512)
    assert text.rope_parameters["mrope_section"] == [8, 12, 12]
    assert (vision.depth, vision.hidden_size, vision.num_heads) == (40, 1536, 16)
    assert (config.vq_config.num_embeddings, config.image_token_id, config.image_end_token_id) == (16384, 167855, 16385)
    assert config.dtype == torch.bfloat16
    processor = AutoProcessor.from_pretrained(str(full_size), subfolder="processor")
    tok = processor.tokenizer
    assert len(tok) == 168064 and tok.pad_token_id == 167841
    assert tok.convert_tokens_to_ids(["<|image|>", "<sop>", "<eop>", "[gMASK]"]) == [167855, 167845, 167846, 167843]
    glyph = AutoConfig.from_pretrained(str(full_size / "text_encoder"))
    assert (glyph.d_model, glyph.num_layers, glyph.num_heads, glyph.d_ff) == (1472, 12, 6, 3584)
    assert len(AutoTokenizer.from_pretrained(str(full_size / "tokenizer"))) > 256  # ByT5
    dit = GlmImageTransformer2DModel.load_config(str(full_size / "transformer"))
    assert (dit["num_layers"], dit["num_attention_heads"], dit["attention_head_dim"], dit["text_embed_dim"]) == (30, 32, 128, 1472)
    vae = AutoencoderKL.load_config(str(full_size / "vae"))
    assert (vae["layers_per_block"], list(vae["block_out_channels"]), vae["latent_channels"]) == (3, [128, 512, 1024, 1024], 16)
    index = json.loads((full_size / "model_index.json").read_text())
    assert index["vision_language_encoder"] == ["transformers", "GlmImageForConditionalGeneration"]


def test_full_size_has_the_released_parameter_counts(full_size):
    counts = random_init.parameter_counts(full_size)
    # The decoder by hand: per layer q/k/v (with bias; k and v 2 KV heads x 128), o, fused gate+up,
    # down and GLM-4's four RMSNorms; then the embedding, the vision-vocabulary lm_head, the final norm.
    hidden, inter, kv = 4096, 13696, 2 * 128
    layer = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden + hidden * 2 * inter + inter * hidden + 4 * hidden
    decoder = 40 * layer + 168064 * hidden + 16512 * hidden + hidden
    assert counts["ar_decoder_params"] == decoder == 8_914_788_352  # the "9B AR"
    assert counts["ar_vision_params"] == 1_159_607_808 and counts["ar_vq_params"] == 39_849_472
    assert counts["ar_params"] == 10_114_245_632  # the whole vision_language_encoder checkpoint
    assert counts["dit_params"] == 6_926_882_880  # the "7B DiT" (6.93 B, as bench/dit_gpu.py built it on an H100)


def test_full_size_is_never_written_with_weights(tmp_path):
    with pytest.raises(ValueError, match="configs only"):
        build_tiny_model(tmp_path / "m", preset="full-size")


def test_build_model_command(tmp_path, capsys):
    from launch.cli import main

    main(["build-model", "--preset", "tiny", "--out", str(tmp_path / "m")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert random_init.folder_is_random_init(tmp_path / "m")
    for command in ("build-model", "ar-worker", "dit-worker", "launch"):
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        assert all(action.help for action in sub._actions if action.dest != "help"), command
    assert build_parser().parse_args(["launch", "--model", "m"]).random_init is False


def test_random_init_is_never_the_default(tiny_model, tmp_path, monkeypatch):
    default = "zai-org/GLM-Image"
    # Real (here: tiny, saved) weights load as they are, under the name asked for.
    assert not random_init.random_init_requested(tiny_model)
    assert random_init.weights_problem(tiny_model) is None
    assert random_init.served_model_name(default, default, tiny_model) == default
    # A folder that lost its weights (an interrupted download) is refused, with the way out named.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "vision_language_encoder" / "model.safetensors").unlink()
    (broken / "glm_image_serve_build.json").unlink()
    problem = random_init.weights_problem(broken)
    assert "vision_language_encoder/" in problem and "--random-init" in problem
    assert random_init.weights_problem(broken, ("dit",)) is None
    # Asked for explicitly: any folder, and the name says so.
    monkeypatch.setenv(random_init.RANDOM_INIT_ENV, "1")
    assert random_init.random_init_requested(tiny_model) and random_init.weights_problem(broken) is None
    assert random_init.served_model_name("glm-image", default, tiny_model) == "glm-image-random-init"
    assert random_init.served_model_name("x-random-init", default, tiny_model) == "x-random-init"


def test_a_folder_written_without_weights_is_served_under_a_name_that_says_so(tiny_random):
    default = "zai-org/GLM-Image"
    assert random_init.random_init_requested(tiny_random)
    assert random_init.served_model_name(default, default, tiny_random) == "glm-image-tiny-random-init"
    assert random_init.served_model_name("mine", default, tiny_random) == "mine-random-init"


def test_worker_refuses_a_folder_without_weights(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "glm_image_serve_build.json").unlink()
    result = subprocess.run([sys.executable, "-m", "launch.cli", "dit-worker", "--router", "tcp://127.0.0.1:1",
                             "--model", str(broken), "--stage-config", str(TINY_STAGE_CONFIG)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1
    assert "no weights in transformer/" in result.stderr and "--random-init" in result.stderr


def test_random_weights_are_made_on_the_device_in_the_dtype_and_seeded(tiny_random):
    before = torch.get_default_dtype()
    ar = random_init.ar_model(tiny_random, torch.bfloat16, "cpu")
    again = random_init.ar_model(tiny_random, torch.bfloat16, "cpu")
    assert torch.get_default_dtype() == before
    params = dict(ar.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert {p.device.type for p in params.values()} == {"cpu"}
    assert all(torch.equal(p, q) for p, q in zip(ar.parameters(), again.parameters()))
    embed = params["model.language_model.embed_tokens.weight"].float()
    assert 0.01 < embed.std().item() < 0.05  # transformers' own initialiser ran (std 0.02), not torch.empty
    assert ar.generation_config.top_k == 136 and ar.config.vq_config.num_embeddings == 128
    pipe = random_init.dit_pipeline(tiny_random, torch.bfloat16, "cpu")
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert all(torch.isfinite(p).all() for p in module.parameters())
    assert pipe.vision_language_encoder is None and pipe.processor is None
    assert random_init.init_seed(tiny_random) == BUILD_SEED


def _launch(model: Path, workdir: Path, *extra: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLM_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLM_SERVE_LOG_LEVEL="INFO")
    out = workdir / "launcher.out"
    with open(out, "wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "launch", "--model", str(model), "--stage-config", str(TINY_STAGE_CONFIG),
             "--port", str(port), "--bus-port", str(free_port()), "--log-dir", str(workdir / "logs"), *extra],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return popen, f"http://127.0.0.1:{port}", out


def _stop(popen: subprocess.Popen) -> None:
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


@pytest.mark.slow
def test_launcher_serves_a_folder_without_weights_with_random_weights(tiny_random, tmp_path):
    """The real launcher on a weightless tiny folder: both workers make random weights (and warn), the
    router serves it as glm-image-tiny-random-init, an image of the asked size comes back."""
    from PIL import Image

    popen, url, out = _launch(tiny_random, tmp_path)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert popen.poll() is None, out.read_text()[-4000:]
            try:
                live = httpx.get(f"{url}/ready", timeout=2, trust_env=False).json().get("live_workers", {})
                if live.get("ar") == 1 and live.get("dit") == 1:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(out.read_text()[-4000:])
        models = httpx.get(f"{url}/v1/models", timeout=10, trust_env=False).json()
        assert [m["id"] for m in models["data"]] == ["glm-image-tiny-random-init"]
        r = httpx.post(f"{url}/v1/images/generations", timeout=180, trust_env=False,
                       json={"prompt": "a red cube", "size": "320x256", "num_inference_steps": 2, "seed": 3})
        assert r.status_code == 200, r.text
        import base64
        import io

        assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (320, 256)
        # The real model's name is not served here: a client asking for it is told so.
        r = httpx.post(f"{url}/v1/images/generations", timeout=30, trust_env=False,
                       json={"prompt": "x", "model": "zai-org/GLM-Image", "size": "256x256"})
        assert r.status_code == 404
    finally:
        _stop(popen)
    for name in ("ar-0", "dit-0"):
        log = (tmp_path / "logs" / f"{name}.log").read_text()
        assert "WARNING" in log and "RANDOM WEIGHTS" in log, log[-3000:]
    assert "RANDOM WEIGHTS" in out.read_text()


@pytest.mark.slow
def test_vllm_engine_uses_dummy_weights_for_a_folder_without_weights(tiny_random):
    """vLLM's `load_format: dummy` with our out-of-tree model, and the random condition-image tokenizer."""
    import asyncio

    from PIL import Image

    from common.sizes import ImageSize, token_layout
    from common.stage_config import AREngineArgs
    from stage_ar.engine import ARGenerationRequest
    from stage_ar.vllm_engine import VllmAREngine

    loop = asyncio.new_event_loop()

    async def start():
        args = AREngineArgs(dtype="float32", max_num_seqs=2, kv_cache_memory_bytes=64 << 20, enforce_eager=True)
        return VllmAREngine(tiny_random, args, "cpu")

    engine = loop.run_until_complete(start())
    try:
        assert engine._random_init
        size = ImageSize(256, 256)
        cond = Image.new("RGB", (256, 256), (200, 30, 30))
        for images in ([], [cond]):
            req = ARGenerationRequest(f"r{len(images)}", "a red cube", size, condition_images=images, seed=1)
            out = loop.run_until_complete(engine.generate(req))
            layout = token_layout(size, image_to_image=bool(images))
            assert out.generated_token_ids.shape == (layout.tokens_to_generate,)
            assert out.prior_token_ids.shape == (8, 8) and int(out.prior_token_ids.max()) < 128
            assert [g.shape for g in out.prior_token_image_ids] == [(8, 8)] * len(images)
    finally:
        loop.run_until_complete(engine.shutdown())
        loop.close()


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_cpu_at_small_depth(tmp_path):
    """bench/gpu_check.sh's own logic: every phase, every check and the table, on the tiny preset."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLM_")}
    # The script runs on the environment this test runs on, wherever set-up put it.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLM_SERVE_VENV=sys.prefix)
    result = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--depth", "small", "--out", str(out),
                             "--work", str(work), "--budget-s", "1200", "--batches", "1,4,16"],
                            capture_output=True, text=True, timeout=1500, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"env", "model", "ready", "request", "check", "e2e", "memory", "decode", "dit", "done"} <= kinds
    requests = {r["name"]: r for r in records if r["kind"] == "request"}
    assert set(requests) == {"t2i_small", "t2i_small_again", "t2i_1024", "t2i_1344x768", "i2i_one", "i2i_two",
                             "stream_previews"}
    assert all(r["ok"] for r in requests.values()), requests
    assert requests["i2i_two"]["condition_images"] == 2 and requests["stream_previews"]["previews"] == 2
    checks = {r["name"]: r["ok"] for r in records if r["kind"] == "check"}
    assert checks == {"served_name_says_random_init": True, "identical_seeded_requests_identical_bytes": True,
                      "streamed_image_equals_unstreamed": True}
    assert [r["batch"] for r in records if r["kind"] == "decode"] == [1, 4, 16]
    assert all(r["step_ms"] > 0 for r in records if r["kind"] == "decode")
    dit = {r["mode"]: r for r in records if r["kind"] == "dit"}
    assert dit["eager"]["step_s"] > 0 and dit["compiled"]["step_s"] > 0 and dit["compiled"]["finite"]
    assert not [r for r in records if r["kind"] == "error"]
    table = (out / "table.md").read_text()
    for heading in ("## Checks", "## End to end, 1024x1024", "## AR decode step", "## DiT seconds per step", "## Peak GPU memory"):
        assert heading in table
    assert "64.3" in table and "25.2" in table
    # What comes back from the device tool: few files, at most two folders down.
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "launcher.log", "logs/ar-0.log", "logs/dit-0.log", "logs/router.log", "results.jsonl", "table.md"]
