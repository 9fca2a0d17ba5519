"""Offline batch vs the HTTP API: the same requests through `run-batch --model` (workers started by the
command, the router core in-process) and through `run-batch --url` against a router process with
the same workers, at the same concurrency.

    .venv/bin/python -m bench.offline_batch --requests 200 --concurrency 3

Both runs use the tiny model (or --model with --stage-config) and one math thread per process;
throughput is images per second from the first request sent to the last result written (worker
start-up excluded on both sides). Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.local_cluster import TINY_STAGE_CONFIG, Cluster
from model_presets.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_batch(source: Path, out: Path, *target: str, concurrency: int) -> dict:
    result = subprocess.run([sys.executable, "-m", "launch.cli", "run-batch", "-i", str(source), "-o", str(out),
                             "--concurrency", str(concurrency), *target],
                            capture_output=True, text=True, cwd=ROOT, env=ENV)
    if result.returncode != 0:
        raise SystemExit(f"run-batch failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GLM-Image folder (default: the tiny model)")
    parser.add_argument("--stage-config", default=str(TINY_STAGE_CONFIG))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=3,
                        help="images in flight, both runs (default: 3, what run-batch --model picks for 1 AR worker "
                             "of batch 1 and 1 DiT worker)")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    model = Path(args.model) if args.model else build_tiny_model(ROOT / "models" / "tiny-glm-image")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "requests.jsonl"
        source.write_text("".join(json.dumps({
            "custom_id": f"r{i}", "method": "POST", "url": "/v1/images/generations",
            "body": {"prompt": f"a lighthouse number {i}", "size": args.size, "seed": i,
                     "num_inference_steps": args.steps}}) + "\n" for i in range(args.requests)))
        offline = run_batch(source, tmp / "offline.jsonl", "--model", str(model), "--stage-config", args.stage_config,
                            concurrency=args.concurrency)
        with Cluster(model=model, workdir=tmp, stage_config=Path(args.stage_config)) as cluster:
            online = run_batch(source, tmp / "online.jsonl", "--url", cluster.url, concurrency=args.concurrency)
    print(f"{'path':<28} {'images':>6} {'seconds':>8} {'images/s':>9}")
    for name, summary in (("run-batch --model (offline)", offline), ("run-batch --url (HTTP API)", online)):
        print(f"{name:<28} {summary['images']:>6} {summary['generation_seconds']:>8.1f} {summary['images_per_s']:>9.3f}")
    print(f"offline / HTTP throughput: {offline['images_per_s'] / online['images_per_s']:.3f}")


if __name__ == "__main__":
    main()
