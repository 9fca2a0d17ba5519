"""Stage configs: every shipped file validates; unknown keys and bad values are named."""

from pathlib import Path

import pytest
import yaml

from common.stage_config import StageConfigError, load_stage_config

pytestmark = pytest.mark.quick

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "stage_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_stage_config(path)
    assert config.ar.stage_type == "ar" and config.dit.stage_type == "dit"
    assert config.limits.size_limits.min_side <= config.limits.size_limits.max_side


def test_two_gpu_config_puts_stages_on_different_gpus():
    config = load_stage_config(Path(CONFIGS[0]).parent / "glm_image.yaml")
    assert (config.ar.devices, config.dit.devices) == ("0", "1")
    assert config.ar.default_sampling_params.top_k == 16512
    assert config.dit.default_sampling_params.num_inference_steps == 50


def _write(tmp_path, mutate):
    raw = yaml.safe_load((Path(CONFIGS[0]).parent / "glm_image_tiny_cpu.yaml").read_text())
    mutate(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda r: r["stage_args"][0].update(engine_argz={}), "stage_args.0.engine_argz: unknown key"),
        (lambda r: r["limits"].update(max_sidee=5), "limits.max_sidee: unknown key"),
        (lambda r: r["stage_args"][0].update(engine="tensorrt"), "stage_args.0.engine"),
        (lambda r: r["stage_args"][1]["default_sampling_params"].update(num_inference_steps=0), "num_inference_steps"),
        (lambda r: r["limits"].update(min_side=4096), "min_side 4096 exceeds max_side"),
        (lambda r: r["stage_args"][0]["engine_args"].update(kv_cache_memory_bytes=0),
         "stage_args.0.engine_args.kv_cache_memory_bytes"),
        (lambda r: r.update(stage_args=r["stage_args"][:1]), "stage_args"),
        # The DiT runs one job per worker: a batch size there would be a knob that does nothing.
        (lambda r: r["stage_args"][1]["engine_args"].update(max_num_seqs=4), "stage_args.1.engine_args.max_num_seqs: unknown key"),
    ],
)
def test_invalid_configs_name_the_key(tmp_path, mutate, expected):
    with pytest.raises(StageConfigError) as err:
        load_stage_config(_write(tmp_path, mutate))
    assert expected in str(err.value)


def test_unreadable_config(tmp_path):
    with pytest.raises(StageConfigError, match="cannot read"):
        load_stage_config(tmp_path / "missing.yaml")


def test_fingerprint_covers_what_router_and_workers_share(tmp_path):
    tiny = load_stage_config(_write(tmp_path, lambda r: None))
    base = tiny.fingerprint()
    assert load_stage_config(_write(tmp_path, lambda r: None)).fingerprint() == base

    def differs(mutate) -> bool:
        return load_stage_config(_write(tmp_path, mutate)).fingerprint() != base

    # What changes the images or the bus protocol's timing must be agreed on ...
    assert differs(lambda r: r["stage_args"][1]["engine_args"].update(dtype="bfloat16"))
    assert differs(lambda r: r["stage_args"][0]["default_sampling_params"].update(top_k=16))
    assert differs(lambda r: r["bus"].update(peer_timeout_s=9.0))
    assert differs(lambda r: r["stage_args"][1]["engine_args"].update(compile=True))
    assert differs(lambda r: r["stage_args"][1]["engine_args"].update(cache={"residual_diff_threshold": 0.2}))
    # ... where a worker runs, where its weights lie and its engine and capacity may differ.
    assert not differs(lambda r: r["stage_args"][0].update(devices="cuda:3"))
    assert not differs(lambda r: r.update(model="/elsewhere/GLM-Image"))
    assert not differs(lambda r: r["stage_args"][0].update(engine="vllm"))
    assert not differs(lambda r: r["stage_args"][0]["engine_args"].update(max_num_seqs=8, gpu_memory_utilization=0.5))
    assert not differs(lambda r: r["stage_args"][0]["engine_args"].update(kv_cache_memory_bytes=1 << 30))
    # The shipped GPU config is not the tiny CPU one: a worker started with it is refused.
    assert load_stage_config(Path(CONFIGS[0]).parent / "glm_image.yaml").fingerprint() != base


def test_the_tiny_vllm_config_differs_only_in_the_ar_engine():
    tiny = load_stage_config(Path(CONFIGS[0]).parent / "glm_image_tiny_cpu.yaml")
    vllm = load_stage_config(Path(CONFIGS[0]).parent / "glm_image_tiny_cpu_vllm.yaml")
    assert (tiny.ar.engine, vllm.ar.engine) == ("transformers", "vllm")
    assert vllm.ar.engine_args.max_num_seqs > 1
    assert vllm.fingerprint() == tiny.fingerprint()  # its workers join a tiny router and vice versa


def test_gpu_configs_batch_the_ar_stage_on_vllm_and_draw_fresh_seeds():
    for name in ("glm_image.yaml", "glm_image_single_gpu.yaml"):
        config = load_stage_config(Path(CONFIGS[0]).parent / name)
        assert config.ar.engine == "vllm" and config.ar.engine_args.max_num_seqs >= 16, name
        assert config.ar.default_sampling_params.seed is None, name
