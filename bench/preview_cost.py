"""What streamed previews cost the DiT: the same job with 0..3 partial images.

    .venv/bin/python -m bench.preview_cost --sizes 256x256 512x512 1024x1024 --steps 8 --repeats 3

Runs the DiT stage's own runner (`DiTPipelineRunner`, the code a DiT worker runs) in this
process on the tiny model (or --model, --device), with the preview steps the router would ask
for, and prints the median job time per size and preview count, the cost per preview, and
whether the final image is byte-identical to the one made without previews. Results go in
docs/streaming.md.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from common.protocol import DiTJob, OriginalPrompt
from common.sizes import ImageSize
from common.stage_config import DiTEngineArgs
from model_presets.tiny_model import build_tiny_model
from router.core.orchestrator import preview_steps
from stage_dit.pipeline_runner import DiTPipelineRunner

ROOT = Path(__file__).resolve().parent.parent


class _CountingReporter:
    """Stands in for the bus: counts what the runner would send."""

    wants_steps = False

    def __init__(self) -> None:
        self.previews = 0

    def steps(self, done: int, total: int) -> None:
        pass

    def preview(self, index: int, image: bytes, done: int, total: int) -> None:
        self.previews += 1


def _job(size: ImageSize, steps: int, partial_images: int, codebook: int) -> DiTJob:
    grid = size.grid
    prior = np.random.default_rng(0).integers(0, codebook, (grid.rows, grid.cols), dtype=np.int64)
    original = OriginalPrompt(prompt='a lighthouse, "GLM" painted on it', height=size.height, width=size.width,
                              seed=1, num_inference_steps=steps, guidance_scale=1.5)
    return DiTJob(original_prompt=original, prior_token_ids=prior, preview_steps=preview_steps(steps, partial_images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GLM-Image folder (default: the tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sizes", nargs="+", default=["256x256", "512x512", "1024x1024"])
    parser.add_argument("--steps", type=int, default=8, help="num_inference_steps")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = Path(args.model) if args.model else build_tiny_model(ROOT / "models" / "tiny-glm-image")
    runner = DiTPipelineRunner(model, DiTEngineArgs(dtype=args.dtype), args.device)
    codebook = runner.pipe.transformer.config.prior_vq_quantizer_codebook_size
    print(f"{'size':>10} {'previews':>8} {'p50 s':>8} {'s/preview':>10} {'final image same':>17}")
    for text in args.sizes:
        size = ImageSize.parse(text)
        baseline_s, baseline_image = None, None
        for partial_images in range(4):
            job = _job(size, args.steps, partial_images, codebook)
            times, reporter = [], _CountingReporter()
            runner.run(job, threading.Event(), reporter)  # warm-up
            for _ in range(args.repeats):
                started = time.perf_counter()
                result = runner.run(job, threading.Event(), reporter)
                times.append(time.perf_counter() - started)
            p50 = statistics.median(times)
            made = len(job.preview_steps)
            if partial_images == 0:
                baseline_s, baseline_image = p50, result.image
                per_preview = "-"
            else:
                per_preview = f"{(p50 - baseline_s) / made:.4f}" if made else "-"
            print(f"{text:>10} {made:>8} {p50:8.3f} {per_preview:>10} {str(result.image == baseline_image):>17}")


if __name__ == "__main__":
    main()
