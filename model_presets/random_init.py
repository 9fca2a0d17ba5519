"""Random weights made on the worker's own device, for timing the released shapes without a checkpoint.

A GLM-Image folder written by `build_model_configs` (`glm-image-serve build-model`) holds configs,
tokenizers and processors but no weights; its stamp says `weights: random-init`. A worker serving it
builds every module from its config directly on its device, in the stage's dtype (bfloat16 on the
GPU configs), and lets the modules' own initialisers fill the weights there: no file, no host copy,
seconds for the full-size 10 B + 7 B model on a GPU. `--random-init` (worker or launch; the
GLM_SERVE_RANDOM_INIT=1 environment it sets) does the same with any folder, weights or not. Nothing
else ever turns it on: a folder with real weights loads them, and one that lacks them (an
interrupted download) is an error that names the flag.

It cannot be mistaken for the real model: every worker logs a WARNING at load, `launch` serves it as
`<name>-random-init` (`served_model_name`), and `/v1/models` says so. The images are noise; the
timings and memory are the real shapes'.

The initialisation is seeded (the folder's build seed), so every worker on the same kind of device
makes the same weights, and two identical seeded requests give identical bytes on any of them. The
vLLM engine does the same with vLLM's `load_format: dummy` (its own small uniform values).

Works on torch 2.11 through 2.13 (`torch.device` as a context manager, `torch.set_default_dtype`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from model_presets.tiny_model import BUILD_SEED, RANDOM_INIT, read_stamp

RANDOM_INIT_ENV = "GLM_SERVE_RANDOM_INIT"
MODEL_NAME_SUFFIX = "-random-init"
# Where each stage's weights live in a GLM-Image folder, and what counts as a weight file.
STAGE_WEIGHT_FOLDERS = {"ar": ("vision_language_encoder",), "dit": ("transformer", "vae", "text_encoder")}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def folder_is_random_init(model_dir: str | Path) -> bool:
    """`model_dir` was written without weights by `build_model_configs` (its stamp says so)."""
    stamp = read_stamp(model_dir)
    return stamp is not None and stamp.get("weights") == RANDOM_INIT


def random_init_requested(model_dir: str | Path) -> bool:
    """Whether a worker loading `model_dir` initialises random weights instead of loading them."""
    return os.environ.get(RANDOM_INIT_ENV) == "1" or folder_is_random_init(model_dir)


def missing_weights(model_dir: str | Path, stage: str) -> list[str]:
    """The folders of `stage` ("ar" or "dit") in `model_dir` that hold no weight file."""
    root = Path(model_dir)
    return [name for name in STAGE_WEIGHT_FOLDERS[stage]
            if not any(p.suffix in _WEIGHT_SUFFIXES for p in (root / name).glob("*"))]


def weights_problem(model_dir: str | Path, stages: tuple[str, ...] = ("ar", "dit")) -> str | None:
    """Why `model_dir` cannot be served by `stages` as it is (weights missing without random init), or None."""
    if random_init_requested(model_dir):
        return None
    missing = sorted({name for stage in stages for name in missing_weights(model_dir, stage)})
    if not missing:
        return None
    return (f"{model_dir} has no weights in {', '.join(f'{m}/' for m in missing)}: download them, or pass "
            "--random-init to serve random weights of its configuration (for timing only: the images are noise)")


def served_model_name(name: str, default: str, model_dir: str | Path) -> str:
    """The model name a router serving `model_dir` reports: with random init it always ends in
    `-random-init` (the default name becomes `glm-image-<preset>-random-init`)."""
    if not random_init_requested(model_dir) or name.endswith(MODEL_NAME_SUFFIX):
        return name
    if name == default:
        stamp = read_stamp(model_dir) or {}
        return f"glm-image-{stamp.get('preset', 'custom')}{MODEL_NAME_SUFFIX}"
    return name + MODEL_NAME_SUFFIX


def warn_random_init(log: logging.Logger, stage: str, model_dir: str | Path, device: str) -> None:
    stamp = read_stamp(model_dir) or {}
    log.warning("RANDOM WEIGHTS: this %s worker initialises random weights on %s from the configs in %s "
                "(preset %s), not the trained GLM-Image: its images are noise, only its timings and memory "
                "are real", stage, device, model_dir, stamp.get("preset", "unknown"))


def init_seed(model_dir: str | Path) -> int:
    stamp = read_stamp(model_dir) or {}
    seed = stamp.get("seed", BUILD_SEED)
    return seed if isinstance(seed, int) else BUILD_SEED


@contextlib.contextmanager
def materialise_on(device: str, dtype, seed: int):
    """Modules built inside this block are created on `device`, in `dtype`, with seeded initial values."""
    import torch

    previous = torch.get_default_dtype()
    torch.manual_seed(seed)  # every device's generator, CUDA's included
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def ar_model(model_dir: str | Path, dtype, device: str):
    """`GlmImageForConditionalGeneration` of the folder's config, random weights on `device` in `dtype`,
    with the folder's generation config (what `from_pretrained` would give, bar the weights)."""
    from transformers import AutoConfig, GenerationConfig, GlmImageForConditionalGeneration

    ar_dir = Path(model_dir) / "vision_language_encoder"
    config = AutoConfig.from_pretrained(str(ar_dir))
    with materialise_on(device, dtype, init_seed(model_dir)):
        model = GlmImageForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig.from_pretrained(str(ar_dir))
    return model.eval()


def ar_vision_modules(model_dir: str | Path, dtype, device: str):
    """(vision encoder, VQ tokenizer) of the AR config, random weights on `device`: what the vLLM
    engine's condition-image tokenizer loads from the checkpoint otherwise."""
    from transformers import AutoConfig
    from transformers.models.glm_image.modeling_glm_image import GlmImageVisionModel, GlmImageVQVAE

    config = AutoConfig.from_pretrained(str(Path(model_dir) / "vision_language_encoder"))
    with materialise_on(device, dtype, init_seed(model_dir)):
        visual = GlmImageVisionModel._from_config(config.vision_config, dtype=dtype)
        vqmodel = GlmImageVQVAE._from_config(config.vq_config, dtype=dtype)
    return visual.eval(), vqmodel.eval()


def dit_pipeline(model_dir: str | Path, dtype, device: str):
    """`GlmImagePipeline` without its AR components (as the DiT worker loads it), every module built
    from the folder's configs with random weights on `device` in `dtype`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

    root = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(root / "scheduler"))
    with materialise_on(device, dtype, init_seed(model_dir)):
        text_encoder = T5EncoderModel._from_config(AutoConfig.from_pretrained(str(root / "text_encoder")), dtype=dtype)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(root / "vae")))
        transformer = GlmImageTransformer2DModel.from_config(GlmImageTransformer2DModel.load_config(str(root / "transformer")))
    pipe = GlmImagePipeline(
        tokenizer=tokenizer,
        processor=None,
        text_encoder=text_encoder.eval(),
        vision_language_encoder=None,
        vae=vae.eval(),
        transformer=transformer.eval(),
        scheduler=scheduler,
    )
    return pipe


def parameter_counts(model_dir: str | Path) -> dict[str, int]:
    """Parameters of the folder's AR checkpoint (all of it, and the decoder + lm_head alone) and DiT,
    counted on modules built on the meta device: nothing is allocated or initialised."""
    import torch
    from diffusers import GlmImageTransformer2DModel
    from transformers import AutoConfig, GlmImageForConditionalGeneration

    root = Path(model_dir)
    config = AutoConfig.from_pretrained(str(root / "vision_language_encoder"))
    with torch.device("meta"):
        ar = GlmImageForConditionalGeneration._from_config(config)
        dit = GlmImageTransformer2DModel.from_config(GlmImageTransformer2DModel.load_config(str(root / "transformer")))

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {"ar_params": count(ar), "ar_decoder_params": count(ar.model.language_model) + count(ar.lm_head),
            "ar_vision_params": count(ar.model.visual), "ar_vq_params": count(ar.model.vqmodel),
            "dit_params": count(dit)}
