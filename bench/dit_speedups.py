"""What the DiT speed-ups buy: time per job and quality vs the plain pipeline.

    .venv/bin/python -m bench.dit_speedups --sizes 512x512 1024x1024 --steps 20 --repeats 2
    .venv/bin/python -m bench.dit_speedups --model /models/GLM-Image --device cuda --dtype bfloat16 \\
        --sizes 1024x1024 --steps 50 --repeats 3

Runs the DiT stage's own runner (`DiTPipelineRunner`, what a DiT worker runs) in this process
with each option set (baseline, cache-dit block caching, regional torch.compile, both) and
prints per size: the median job time, the speed-up over the baseline, the transformer passes
whose middle blocks the cache skipped, and the PSNR of the image against the baseline's.
The compile column's first job (which compiles) is reported apart from the steady state.

    .venv/bin/python -m bench.dit_speedups --real-shape --device cuda --dtype bfloat16 --sizes 512x512 1024x1024

--real-shape needs no weights: a random-weight transformer of GLM-Image's shape
(bench.dit_batching.REAL_SHAPE), timing one denoising step (conditional + unconditional pass,
as the pipeline runs it) eager and with the regional compile, and the compiled output's largest
difference from eager relative to the output's scale. Block caching needs trained weights to decide what to skip,
so it is left out there.

Without --model it runs a deeper variant of the tiny random-weight model (`--layers`
transformer blocks; the tiny model has one, and block caching needs blocks between the first
and the last to skip). Random weights make the PSNR a check of the mechanism, not of image
quality; real-weight numbers come from --model on a GPU. Results go in docs/dit_speed.md.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.protocol import DiTJob, OriginalPrompt
from common.sizes import ImageSize
from common.stage_config import BlockCacheSettings, DiTEngineArgs
from model_presets.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = 'a lighthouse, "GLM" painted on it'


def deep_tiny_model(out_dir: Path, layers: int, base: Path | None = None) -> Path:
    """The tiny model with a `layers`-block transformer (seeded random weights); every other
    component is a symlink to the tiny model's. Rebuilt only when absent."""
    import torch
    from diffusers import GlmImageTransformer2DModel

    out = Path(out_dir)
    if (out / "transformer" / "config.json").exists():
        return out
    base = build_tiny_model(base or ROOT / "models" / "tiny-glm-image")
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for part in ("model_index.json", "scheduler", "text_encoder", "tokenizer", "vae", "processor", "vision_language_encoder"):
        if (base / part).exists():
            (tmp / part).symlink_to((base / part).resolve())
    config = {k: v for k, v in json.loads((base / "transformer" / "config.json").read_text()).items() if not k.startswith("_")}
    config["num_layers"] = layers
    torch.manual_seed(7)
    GlmImageTransformer2DModel(**config).eval().save_pretrained(tmp / "transformer")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def make_job(size: ImageSize, steps: int, codebook: int, seed: int = 1, condition_images: list[bytes] = (),
             guidance_scale: float = 1.5) -> DiTJob:
    """A DiT job with random prior codes (seeded), as the AR stage would send it."""
    rng = np.random.default_rng(seed)
    grid = size.grid
    prior = rng.integers(0, codebook, (grid.rows, grid.cols), dtype=np.int64)
    cond_grids = []
    for png in condition_images:
        cond = ImageSize(*Image.open(io.BytesIO(png)).size).grid
        cond_grids.append(rng.integers(0, codebook, (cond.rows, cond.cols), dtype=np.int64))
    original = OriginalPrompt(prompt=PROMPT, height=size.height, width=size.width, seed=seed, num_inference_steps=steps,
                              guidance_scale=guidance_scale, condition_images=list(condition_images))
    return DiTJob(original_prompt=original, prior_token_ids=prior, prior_token_image_ids=cond_grids)


def psnr(a: bytes, b: bytes) -> float:
    """PSNR in dB between two encoded images of one size (inf when identical)."""
    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def max_abs_diff(a: bytes, b: bytes) -> int:
    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.int16)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.int16)
    return int(np.abs(x - y).max())


@dataclass(frozen=True)
class CacheJobStats:
    """What the block cache did in the runner's last job: transformer passes whose middle blocks were skipped."""

    cached_steps: int  # conditional passes (one per denoising step)
    cached_cfg_steps: int  # unconditional (classifier-free guidance) passes

    @property
    def skipped_passes(self) -> int:
        return self.cached_steps + self.cached_cfg_steps


def cache_job_stats(runner) -> CacheJobStats:
    """What the block cache skipped in a block-cached runner's last job, read from cache-dit's
    contexts on its transformer: `BlockCache` rebuilds them before each job, so after `runner.run`
    they hold that job's steps until the next job starts."""
    transformer = runner.pipe.transformer
    cached = cfg_cached = 0
    for name in transformer._context_names:
        context = transformer._context_manager.get_context(name)
        cached += len(context.get_cached_steps())
        cfg_cached += len(context.get_cfg_cached_steps())
    return CacheJobStats(cached, cfg_cached)


def real_shape(args) -> None:
    """Eager vs regional compile, per denoising step, on a random-weight GLM-Image-shaped DiT."""
    import torch
    from diffusers import GlmImageTransformer2DModel

    from bench.dit_batching import REAL_SHAPE, transformer_step_times
    from common.stage_config import CompileSettings
    from stage_dit.speedups import compile_repeated_blocks

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = GlmImageTransformer2DModel(**REAL_SHAPE).to(dtype).eval()
    print(f"random-weight GLM-Image DiT ({sum(p.numel() for p in transformer.parameters()) / 1e9:.2f}B params) "
          f"on {device} ({args.dtype}), {args.steps} steps")
    print(f"{'size':>10} {'option':>8} {'first s':>8} {'s/step':>8} {'speed-up':>8} {'max rel diff':>12}")

    def one_pass(size):
        torch.manual_seed(1)
        config = transformer.config
        latents = torch.randn(1, config.in_channels, size.height // 8, size.width // 8, device=device, dtype=dtype)
        n = (size.height // 16) * (size.width // 16)
        prior = torch.randint(0, config.prior_vq_quantizer_codebook_size, (1, n), device=device)
        with torch.inference_mode():
            return transformer(hidden_states=latents, encoder_hidden_states=torch.randn(1, 32, config.text_embed_dim, device=device, dtype=dtype),
                               prior_token_id=prior, prior_token_drop=torch.zeros_like(prior, dtype=torch.bool),
                               timestep=torch.full((1,), 500.0, device=device),
                               target_size=torch.tensor([[size.height, size.width]], device=device, dtype=dtype),
                               crop_coords=torch.zeros(1, 2, device=device, dtype=dtype), return_dict=False)[0].float()

    eager: dict[str, tuple[float, "torch.Tensor"]] = {}
    for option in ("baseline", "compile"):
        if option == "compile":
            compile_repeated_blocks(transformer, CompileSettings())
        for text in args.sizes:
            size = ImageSize.parse(text)
            started = time.perf_counter()
            transformer_step_times(transformer, size, 1, 2, device, dtype)  # warm-up (compiles)
            first = time.perf_counter() - started
            per_step = statistics.median(transformer_step_times(transformer, size, 1, args.steps + 1, device, dtype))
            out = one_pass(size)
            if option == "baseline":
                eager[text] = (per_step, out)
            base_s, base_out = eager[text]
            rel = float((out - base_out).abs().max() / base_out.abs().max())
            print(f"{text:>10} {option:>8} {first:8.2f} {per_step:8.4f} {base_s / per_step:7.2f}x {rel:12.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GLM-Image folder (default: the tiny model, deepened to --layers blocks)")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks of the tiny model variant")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sizes", nargs="+", default=["512x512", "1024x1024"])
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=None,
                        help="cache residual_diff_threshold (default: the config default, 0.12)")
    parser.add_argument("--warmup", type=int, default=None, help="cache max_warmup_steps (default: 8)")
    parser.add_argument("--options", nargs="+", default=["baseline", "cache", "compile", "cache+compile"])
    parser.add_argument("--real-shape", action="store_true", help="eager vs compile on a random-weight DiT of GLM-Image's shape")
    args = parser.parse_args()
    if args.real_shape:
        return real_shape(args)
    from stage_dit.pipeline_runner import DiTPipelineRunner  # the worker's stack (ZeroMQ included)

    model = Path(args.model) if args.model else deep_tiny_model(ROOT / "models" / f"tiny-glm-image-{args.layers}l", args.layers)
    overrides = {k: v for k, v in {"residual_diff_threshold": args.threshold, "max_warmup_steps": args.warmup}.items() if v is not None}
    cache = BlockCacheSettings(**overrides)
    print(f"model {model}, {args.steps} steps, cache settings {cache.model_dump()}")
    print(f"{'size':>10} {'option':>14} {'first s':>8} {'p50 s':>8} {'speed-up':>8} {'skipped':>9} {'PSNR dB':>8} {'max diff':>8}")
    # All options stay loaded and take turns within each repeat, so load on a shared machine
    # drifts over all of them alike instead of over whichever option ran last.
    runners = {option: DiTPipelineRunner(model, DiTEngineArgs(
        dtype=args.dtype, cache=cache if "cache" in option else None, compile="compile" in option), args.device)
        for option in args.options}
    codebook = next(iter(runners.values())).pipe.transformer.config.prior_vq_quantizer_codebook_size
    passes = 2  # conditional + unconditional per step at guidance 1.5
    for text in args.sizes:
        job = make_job(ImageSize.parse(text), args.steps, codebook)
        first, times, images = {}, {option: [] for option in runners}, {}
        for option, runner in runners.items():
            started = time.perf_counter()
            runner.run(job, threading.Event())  # warm-up (compiles, for compile)
            first[option] = time.perf_counter() - started
        for _ in range(args.repeats):
            for option, runner in runners.items():
                started = time.perf_counter()
                images[option] = runner.run(job, threading.Event()).image
                times[option].append(time.perf_counter() - started)
        base_s = statistics.median(times["baseline"]) if "baseline" in runners else math.nan
        for option, runner in runners.items():
            p50 = statistics.median(times[option])
            base_image = images.get("baseline")
            skipped = f"{cache_job_stats(runner).skipped_passes}/{args.steps * passes}" if runner.cache else "-"
            quality = psnr(images[option], base_image) if base_image else math.nan
            diff = max_abs_diff(images[option], base_image) if base_image else -1
            print(f"{text:>10} {option:>14} {first[option]:8.3f} {p50:8.3f} {base_s / p50:7.2f}x {skipped:>9} "
                  f"{quality:8.2f} {diff:8d}", flush=True)

if __name__ == "__main__":
    main()
