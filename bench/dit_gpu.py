"""The DiT stage on a GPU at the released model's shapes: step time, batching, compile, previews.

    python -m bench.dit_gpu --size 1024 --steps 50            # on a CUDA machine

No real weights are needed: the pipeline is built in memory from the released GLM-Image DiT
shapes (full depth, random weights, bfloat16) with the same diffusers classes the DiT worker
loads (`GlmImagePipeline` without its AR components), and run the way the worker runs it (prior
tokens passed in, classifier-free guidance 1.5). Speed does not depend on the weights' values.

It prints, for one image of `--size` x `--size` and `--steps` steps:
  - the denoising step time at batch 1 and batch 2 (two jobs in one call), which decides whether a
    DiT worker should batch jobs (one job per worker unless batch 2 costs well under 2x per step);
  - the same with the transformer's repeated blocks compiled (`torch.compile`, regional);
  - the VAE decode of the final image and of one streamed preview (half resolution).

Shapes, and where they come from:
  DiT: 30 layers, 32 heads x 128 (4096 wide), patch 2, 16 latent channels, glyph text width 1472,
       time 512, condition 256, prior codebook 16384: SGLang's `GlmImageArchConfig` (a port of the
       released `transformer/config.json`) and the model card's "7B single-stream DiT".
  Glyph encoder: ByT5-small (T5 encoder, d_model 1472, 12 layers, 6 heads, d_ff 3584): the DiT's
       text_embed_dim is ByT5-small's d_model.
  VAE: AutoencoderKL, 4 blocks (128, 256, 512, 512), 2 layers per block, 16 latent channels
       (scale factor 8, as the pipeline requires).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def build_pipeline(device: str, dtype: torch.dtype):
    """GlmImagePipeline at the released DiT shapes, random weights, without its AR components."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline, GlmImageTransformer2DModel
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    with torch.device(device):
        transformer = GlmImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=30, attention_head_dim=128,
            num_attention_heads=32, text_embed_dim=1472, time_embed_dim=512, condition_dim=256,
            prior_vq_quantizer_codebook_size=16384).to(dtype)
        tokenizer = ByT5Tokenizer()
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False)).to(dtype)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, latent_channels=16, latents_mean=[0.0] * 16, latents_std=[1.0] * 16).to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    pipe = GlmImagePipeline(tokenizer=tokenizer, processor=None, text_encoder=text_encoder,
                            vision_language_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_times(pipe, size: int, steps: int, batch: int, device: str) -> tuple[float, float]:
    """(median denoising step seconds, whole call seconds) for `batch` images in one call."""
    grid = size // 16
    prior = torch.randint(0, 16384, (1, grid * grid), device=device)
    stamps: list[float] = []

    def on_step(pipe_, step, sigma, kwargs):
        _sync(device)
        stamps.append(time.perf_counter())
        return kwargs

    _sync(device)
    started = time.perf_counter()
    pipe(prompt='a lighthouse, "GLM" painted on it', height=size, width=size, num_inference_steps=steps,
         guidance_scale=1.5, prior_token_ids=prior, num_images_per_prompt=batch,
         generator=torch.Generator(device=device).manual_seed(1), callback_on_step_end=on_step, output_type="latent")
    _sync(device)
    total = time.perf_counter() - started
    deltas = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(deltas), total


@torch.inference_mode()
def decode_seconds(pipe, size: int, device: str, half: bool) -> float:
    """One VAE decode of a `size` image's latents (at half resolution for a preview)."""
    latents = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=pipe.vae.dtype)
    if half:
        latents = F.avg_pool2d(latents, 2)
    times = []
    for _ in range(4):
        _sync(device)
        started = time.perf_counter()
        pipe.vae.decode(latents, return_dict=False)
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    dtype = torch.bfloat16
    pipe = build_pipeline(args.device, dtype)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                                  "transformer_params": params, "size": args.size, "steps": args.steps}
    step_times(pipe, args.size, 3, 1, args.device)  # warm-up (kernels, allocator)
    for batch in (1, 2):
        step, total = step_times(pipe, args.size, args.steps, batch, args.device)
        results[f"eager_bs{batch}_step_s"], results[f"eager_bs{batch}_call_s"] = round(step, 4), round(total, 3)
    if not args.no_compile:
        started = time.perf_counter()
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        step_times(pipe, args.size, 3, 1, args.device)  # compiles for this size
        results["compile_s"] = round(time.perf_counter() - started, 1)
        for batch in (1, 2):
            step_times(pipe, args.size, 2, batch, args.device)  # batch 2 is a new shape: compile it before timing
            step, total = step_times(pipe, args.size, args.steps, batch, args.device)
            results[f"compiled_bs{batch}_step_s"], results[f"compiled_bs{batch}_call_s"] = round(step, 4), round(total, 3)
    results["vae_decode_s"] = round(decode_seconds(pipe, args.size, args.device, half=False), 4)
    results["preview_decode_s"] = round(decode_seconds(pipe, args.size, args.device, half=args.size >= 512), 4)
    if args.device.startswith("cuda"):
        results["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
