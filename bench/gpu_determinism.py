"""Which stage makes two same-seed requests differ? The AR engine and the DiT runner, each run twice.

The GPU check (bench/gpu_check.py) found on one H200 that two 512x512 requests with one seed did not
return identical bytes (on CPU they do: tests/test_seeds_and_cache.py). This runs the workers' own
engines in one process, as the workers build them (random weights on the device for a folder
without weights, like the GPU check):

1. the transformers AR engine generates the same request (same seed) twice: are the token ids equal,
   and where do they first differ;
2. the DiT runner denoises and decodes the first run's prior tokens twice: are the image bytes equal.

    python -m bench.gpu_determinism --device cuda:0 --out $OUT          # full size, on a GPU
    python -m bench.gpu_determinism --device cpu --preset tiny --out /tmp/det   # its logic, on a CPU

Writes results.jsonl (one JSON object per line) to --out and prints each line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _model(preset: str, work: Path) -> Path:
    from model_presets.tiny_model import build_model_configs, build_tiny_model

    if preset in ("tiny", "real-shape"):
        return build_tiny_model(work / f"{preset}-glm-image", preset=preset)
    return build_model_configs(work / f"{preset}-glm-image", preset=preset)


def _first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    n = min(len(a), len(b))
    unequal = np.flatnonzero(a[:n] != b[:n])
    return int(unequal[0]) if len(unequal) else (None if len(a) == len(b) else n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--preset", default="full-size", help="full-size (weights made on the device), real-shape or tiny")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--size", default="512x512", help="WxH")
    p.add_argument("--steps", type=int, default=4, help="denoising steps")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out" / "gpu-determinism"))
    args = p.parse_args()

    from common.protocol import DiTJob, OriginalPrompt
    from common.sizes import ImageSize
    from common.stage_config import AREngineArgs, DiTEngineArgs
    from stage_ar.engine import ARGenerationRequest
    from stage_ar.transformers_engine import TransformersAREngine
    from stage_dit.pipeline_runner import DiTPipelineRunner

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = open(out / "results.jsonl", "w")
    started = time.monotonic()

    def record(kind: str, **fields) -> None:
        line = json.dumps({"kind": kind, "t_s": round(time.monotonic() - started, 1), **fields})
        print(line, flush=True)
        results.write(line + "\n")
        results.flush()

    width, height = (int(v) for v in args.size.lower().split("x"))
    prompt = 'a lighthouse at dawn, "HELLO" painted on it'
    model = _model(args.preset, Path(tempfile.mkdtemp(prefix="glm-determinism-")))

    engine = TransformersAREngine(model, AREngineArgs(dtype=args.dtype), args.device)
    runs = []
    for attempt in range(2):
        req = ARGenerationRequest(f"ar-{attempt}", prompt, ImageSize(width, height), seed=args.seed)
        t = time.monotonic()
        runs.append(asyncio.run(engine.generate(req)))
        record("ar_run", attempt=attempt, seconds=round(time.monotonic() - t, 2),
               tokens=int(len(runs[-1].generated_token_ids)))
    first, second = (np.asarray(r.generated_token_ids) for r in runs)
    record("ar_same_seed", equal=bool(np.array_equal(first, second)), first_difference=_first_difference(first, second),
           tokens=int(len(first)))
    prior = runs[0].prior_token_ids
    del engine
    _empty_cache(args.device)

    runner = DiTPipelineRunner(model, DiTEngineArgs(dtype=args.dtype), args.device)
    original = OriginalPrompt(prompt=prompt, height=height, width=width, seed=args.seed,
                              num_inference_steps=args.steps, guidance_scale=1.5)
    images = []
    for attempt in range(2):
        t = time.monotonic()
        images.append(runner.run(DiTJob(original_prompt=original, prior_token_ids=prior), threading.Event()).image)
        record("dit_run", attempt=attempt, seconds=round(time.monotonic() - t, 2), bytes=len(images[-1]))
    record("dit_same_prior_same_seed", equal=images[0] == images[1])
    record("done", seconds=round(time.monotonic() - started, 1))


def _empty_cache(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
