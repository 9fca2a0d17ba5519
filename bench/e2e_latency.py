"""End-to-end latency through the real system (router + workers as processes, HTTP + ZeroMQ).

    .venv/bin/python -m bench.e2e_latency --sizes 512x512 1024x1024 --repeats 3 --steps 4

Starts a cluster on the tiny model (or --model), sends sequential requests per size and prints
p50/min per size with the per-stage split the router reports. Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from common.sizes import ImageSize, token_layout
from model_presets.tiny_model import build_tiny_model
from harness.local_cluster import Cluster, write_stage_config

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GLM-Image folder (default: the tiny model)")
    parser.add_argument("--sizes", nargs="+", default=["256x256", "512x512", "1024x1024"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="num_inference_steps")
    args = parser.parse_args()
    model = Path(args.model) if args.model else build_tiny_model(ROOT / "models" / "tiny-glm-image")
    with tempfile.TemporaryDirectory() as tmp:
        config = write_stage_config(Path(tmp))
        with Cluster(model=model, workdir=Path(tmp), stage_config=config) as cluster:
            client = httpx.Client(base_url=cluster.url, timeout=600)
            client.post("/v1/images/generations", json={"prompt": "warm-up", "size": "256x256", "num_inference_steps": 1}).raise_for_status()
            print(f"{'size':>10} {'p50 s':>7} {'min s':>7} {'AR s':>7} {'DiT s':>7} {'AR tok/s':>9}")
            for size in args.sizes:
                totals, ars, dits = [], [], []
                for i in range(args.repeats):
                    started = time.perf_counter()
                    r = client.post("/v1/images/generations", json={"prompt": "a lighthouse at dawn", "size": size, "seed": i, "num_inference_steps": args.steps})
                    r.raise_for_status()
                    totals.append(time.perf_counter() - started)
                    t = r.json()["timings"][0]
                    ars.append(t["ar_s"])
                    dits.append(t["dit_s"])
                tokens = token_layout(ImageSize.parse(size), image_to_image=False).tokens_to_generate
                ar = statistics.median(ars)
                print(f"{size:>10} {statistics.median(totals):7.2f} {min(totals):7.2f} {ar:7.2f} {statistics.median(dits):7.2f} {tokens / ar:9.0f}")


if __name__ == "__main__":
    main()
