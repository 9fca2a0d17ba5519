"""GLM-Image's decode positions broken on purpose: the negative controls of the position checks.

Two ways they go wrong, built from the product's own code with one piece replaced:
  "linear"       - stock vLLM: decode positions continue linearly after the prompt;
  "grid-start+1" - the 2D layout, with every generated grid starting one position late.

tests/test_decode_positions.py shows the position comparison catches both; tests/test_vllm_engine.py
runs vLLM with a model that has them and shows the log-prob parity check fails.

How the broken model reaches vLLM: `AsyncLLM` always runs its engine core (where the model lives)
in another process, and vLLM's CPU platform makes that a spawned one, so a monkeypatch made in the
test process never reaches the model. vLLM does load `vllm.general_plugins` entry points in every
process, so `write_plugin_dist` writes a distribution stub declaring one plugin per variant, which
runs the product's plugin and then registers the architecture to the broken model; the test puts
the stub on the path and selects one variant with VLLM_PLUGINS, for that engine only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from vllm import ModelRegistry

from stage_ar.mrope_positions import DecodeLayouts
from stage_ar.vllm_model import GlmImageForConditionalGeneration
from stage_ar.vllm_plugin import ARCHITECTURE, register

# variant -> the vLLM plugin name that selects it
PLUGINS = {
    "linear": "glm_image_ar_broken_linear",
    "grid-start+1": "glm_image_ar_broken_grid_start_plus_1",
}
VARIANTS = tuple(PLUGINS)


def linear_delta(prompt_positions: torch.Tensor, prompt_length: int) -> int:
    """Stock vLLM's M-RoPE delta (its Qwen2-VL and GLM-4V models): decode positions continue
    linearly from the prompt's largest position, in all three channels."""
    return int(prompt_positions.max()) + 1 - prompt_length


class LateGridLayouts(DecodeLayouts):
    """Decode layouts whose generated grids all start one position late."""

    def intern(self, start: int, grids: list[tuple[int, int]]) -> int:
        return super().intern(start + 1, grids)


class LinearDecodeModel(GlmImageForConditionalGeneration):
    """The product model with stock linear decode positions."""

    def get_mrope_input_positions(self, input_tokens, mm_features):
        positions, _ = super().get_mrope_input_positions(input_tokens, mm_features)
        return positions, linear_delta(positions, len(input_tokens))


class LateGridDecodeModel(GlmImageForConditionalGeneration):
    """The product model with its generated grids one position late."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.mrope.layouts = LateGridLayouts(self.mrope.layouts.table.device)


_MODELS = {"linear": LinearDecodeModel, "grid-start+1": LateGridDecodeModel}


def _register(variant: str) -> None:
    # Everything the product's plugin does in a vLLM process, then the architecture re-registered
    # to the broken model (VLLM_PLUGINS leaves the product's plugin itself out).
    register()
    ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:{_MODELS[variant].__name__}")


def register_linear() -> None:
    """vLLM plugin: GLM-Image with linear decode positions."""
    _register("linear")


def register_grid_start_plus_1() -> None:
    """vLLM plugin: GLM-Image with its generated grids one position late."""
    _register("grid-start+1")


_ENTRY_POINTS = {"linear": "register_linear", "grid-start+1": "register_grid_start_plus_1"}


def write_plugin_dist(root: Path) -> Path:
    """Write a distribution stub under `root` declaring the variants as vLLM general plugins.

    With `root` on sys.path (a spawned process starts from its parent's sys.path),
    `importlib.metadata` finds the entry points; VLLM_PLUGINS=PLUGINS[variant] picks one.
    """
    dist = root / "glm_image_broken_positions-0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: glm-image-broken-positions\nVersion: 0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[vllm.general_plugins]\n"
        + "".join(f"{PLUGINS[v]} = {__name__}:{_ENTRY_POINTS[v]}\n" for v in VARIANTS)
    )
    return root
