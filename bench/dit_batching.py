"""Is batching DiT jobs worth it? Time per denoising step at batch 1 vs batch 2.

    .venv/bin/python -m bench.dit_batching --sizes 512x512 1024x1024 --steps 6
    .venv/bin/python -m bench.dit_batching --model /models/GLM-Image --device cuda --dtype bfloat16
    .venv/bin/python -m bench.dit_batching --real-shape --device cuda --dtype bfloat16   # no weights needed

Two levels:

- pipeline (default): `GlmImagePipeline` called the way a batched DiT worker would call it, with
  one prompt and prior grid per job (`prompt=[...]`, `prior_token_ids` of shape (batch, N));
  the step time is the median interval between step-end callbacks, so text encoding and the VAE
  are left out. Runs the tiny model (or --model: real weights).
- --real-shape: no weights at all: a random-weight `GlmImageTransformer2DModel` of GLM-Image's
  DiT shape (`REAL_SHAPE`: 30 blocks, 32 heads x 128 = 4096 hidden, ~7B), timing one
  denoising step as the pipeline runs it (a conditional and an unconditional pass) on inputs of
  the real shapes. This is the number that decides, on a GPU.

Prints seconds per step at each batch size, the cost of batch 2 relative to batch 1, and the
time per image-step. Batching pays only if batch 2 costs clearly less than 2x batch 1 per step.
Results and the decision: docs/dit_speed.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common.sizes import ImageSize
from model_presets.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
# GLM-Image's DiT (~7B): 30 blocks of 32 heads x 128 = 4096 hidden (SGLang's GlmImageArchConfig;
# diffusers' class defaults, 64 x 40, are a smaller ~2.9B shape).
REAL_SHAPE = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=30, attention_head_dim=128,
                  num_attention_heads=32, text_embed_dim=1472, time_embed_dim=512, condition_dim=256,
                  prior_vq_quantizer_codebook_size=16384)
PROMPTS = ['a lighthouse at dawn, "HELLO" painted on it', 'a red bicycle against a wall, "GLM" on a sign',
           'a bowl of ramen, "SOUP"', 'a city at night, "OPEN" in neon']


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pipeline_step_times(pipe, size: ImageSize, batch: int, steps: int, device: torch.device) -> list[float]:
    """Seconds between step-end callbacks of one pipeline call denoising `batch` jobs together."""
    codebook = pipe.transformer.config.prior_vq_quantizer_codebook_size
    rng = np.random.default_rng(0)
    n = (size.height // 16) * (size.width // 16)
    prior = torch.from_numpy(rng.integers(0, codebook, (batch, n), dtype=np.int64)).to(device)
    stamps: list[float] = []

    def on_step_end(_pipe, step, _t, kwargs):
        _sync(device)
        stamps.append(time.perf_counter())
        return kwargs

    pipe(prompt=PROMPTS[:batch], height=size.height, width=size.width, num_inference_steps=steps, guidance_scale=1.5,
         generator=[torch.Generator(device=device).manual_seed(i) for i in range(batch)], prior_token_ids=prior,
         callback_on_step_end=on_step_end, output_type="latent")
    return [b - a for a, b in zip(stamps, stamps[1:])]


def transformer_step_times(transformer, size: ImageSize, batch: int, steps: int, device: torch.device,
                           dtype: torch.dtype) -> list[float]:
    """Seconds per denoising step (conditional + unconditional pass) of `transformer` on inputs of
    the pipeline's shapes for `batch` jobs."""
    config = transformer.config
    latents = torch.randn(batch, config.in_channels, size.height // 8, size.width // 8, device=device, dtype=dtype)
    n = (size.height // 16) * (size.width // 16)
    prior = torch.randint(0, config.prior_vq_quantizer_codebook_size, (batch, n), device=device)
    # Glyph embeddings: a quoted text of a few words, and the empty text of the unconditional pass.
    text = torch.randn(batch, 32, config.text_embed_dim, device=device, dtype=dtype)
    empty = torch.randn(batch, 2, config.text_embed_dim, device=device, dtype=dtype)
    common = dict(prior_token_id=prior, target_size=torch.tensor([[size.height, size.width]] * batch, device=device, dtype=dtype),
                  crop_coords=torch.zeros(batch, 2, device=device, dtype=dtype), return_dict=False)
    times = []
    with torch.inference_mode():
        for step in range(steps):
            timestep = torch.full((batch,), 999.0 - step, device=device)
            _sync(device)
            started = time.perf_counter()
            transformer(hidden_states=latents, encoder_hidden_states=text, timestep=timestep,
                        prior_token_drop=torch.zeros_like(prior, dtype=torch.bool), **common)
            transformer(hidden_states=latents, encoder_hidden_states=empty, timestep=timestep,
                        prior_token_drop=torch.ones_like(prior, dtype=torch.bool), **common)
            _sync(device)
            times.append(time.perf_counter() - started)
    return times[1:]  # the first step warms up kernels and allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GLM-Image folder (default: the tiny model)")
    parser.add_argument("--real-shape", action="store_true", help="random-weight transformer of GLM-Image's shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "1024x1024"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=6, help="denoising steps timed per measurement")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    if args.real_shape:
        from diffusers import GlmImageTransformer2DModel

        with torch.device(device):
            model = GlmImageTransformer2DModel(**REAL_SHAPE).to(dtype).eval()
        label = f"random-weight transformer, GLM-Image shape ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params)"

        def measure(size, batch):
            return transformer_step_times(model, size, batch, args.steps + 1, device, dtype)
    else:
        from diffusers import GlmImagePipeline

        path = args.model or build_tiny_model(ROOT / "models" / "tiny-glm-image")
        model = GlmImagePipeline.from_pretrained(str(path), vision_language_encoder=None, processor=None, dtype=dtype).to(device)
        model.set_progress_bar_config(disable=True)
        label = f"GlmImagePipeline from {path}"

        def measure(size, batch):
            return pipeline_step_times(model, size, batch, args.steps + 1, device)

    print(f"{label} on {device} ({args.dtype}), {args.steps} steps x {args.repeats} repeats, guidance 1.5 (2 passes per step)")
    print(f"{'size':>10} {'batch':>5} {'s/step':>9} {'vs batch 1':>10} {'s/image-step':>12}")
    for text in args.sizes:
        size = ImageSize.parse(text)
        base = None
        for batch in args.batches:
            measure(size, batch)  # warm-up
            per_step = statistics.median(t for _ in range(args.repeats) for t in measure(size, batch))
            base = base or per_step
            print(f"{text:>10} {batch:>5} {per_step:9.4f} {per_step / base - 1:+9.0%} {per_step / batch:12.4f}", flush=True)


if __name__ == "__main__":
    main()
