"""Throughput with LoRA adapters: requests spread over 1, 4 and 16 adapters on 2 DiT workers, against
the same requests with no adapter.

    .venv/bin/python -m bench.lora_throughput --requests 48 --concurrency 6 --steps 8
    .venv/bin/python -m bench.lora_throughput --model /models/GLM-Image --stage-config stage_configs/glm_image.yaml \
        --num-dit 2 --size 1024x1024 --steps 50 --requests 64 --concurrency 16

Starts a router, 1 AR worker and `--num-dit` DiT workers (harness/local_cluster.py) with a LoRA
folder of 16 random adapters made by PEFT for the model's DiT (model_presets/tiny_lora.py) and
`--max-loras` slots a worker. Each level sends `--requests` text-to-image requests (the same
prompts, size and steps; seeds of its own, so none is a result-cache hit) at `--concurrency` in
flight; request i of the "k adapters" level uses adapter i mod k, so with k > max_loras x workers
the workers must evict and reload. Prints images/s per level, the ratio to no adapters, and the
adapter loads and evictions the DiT workers counted during the level. With the tiny model the AR
stage (one decoder, one image at a time) bounds throughput unless the DiT has more steps per
image: `--steps` sets how much work each image gives the DiT. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness.local_cluster import TINY_STAGE_CONFIG, Cluster, write_stage_config
from model_presets.tiny_lora import LoraRecipe, make_loras
from model_presets.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = 16


def dit_counter(cluster: Cluster, num_dit: int, sample: str, **labels: str) -> float:
    """The sum over the DiT workers (their /metrics) of the samples named `sample` that carry `labels`."""
    total = 0.0
    for i in range(num_dit):
        text = httpx.get(f"http://127.0.0.1:{cluster.metrics_ports[f'dit-{i}']}/metrics", timeout=10).text
        total += sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                     if s.name == sample and labels.items() <= s.labels.items())
    return total


async def level(url: str, adapters: int, args: argparse.Namespace, seed_base: int) -> float:
    """Images/s of `args.requests` requests at `args.concurrency`, over `adapters` adapters (0: none).
    Seeds from `seed_base`: each level its own, so that no request is a result-cache hit."""
    gate = asyncio.Semaphore(args.concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": f"a lighthouse number {i}", "size": args.size, "seed": seed_base + i,
                "num_inference_steps": args.steps}
        if adapters:
            body["loras"] = [{"name": f"style{i % adapters}", "scale": 1.0}]
        async with gate:
            reply = await client.post("/v1/images/generations", json=body)
        if reply.status_code != 200:
            raise SystemExit(f"request {i} ({adapters} adapters) failed: {reply.status_code} {reply.text[:300]}")

    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, trust_env=False,
                                 limits=httpx.Limits(max_connections=args.concurrency)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(args.requests)))
        return args.requests / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="GLM-Image folder (default: the tiny model)")
    parser.add_argument("--stage-config", default=str(TINY_STAGE_CONFIG))
    parser.add_argument("--num-dit", type=int, default=2)
    parser.add_argument("--max-loras", type=int, default=4, help="adapters a DiT worker keeps loaded")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 4, 16],
                        help=f"adapters the requests spread over (0: none; at most {ADAPTERS})")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    if any(not 0 <= k <= ADAPTERS for k in args.levels):
        parser.error(f"--levels: each between 0 and {ADAPTERS}")
    model = Path(args.model) if args.model else build_tiny_model(ROOT / "models" / "tiny-glm-image")
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        work = Path(tmp)
        loras = work / "loras"
        make_loras(model, [LoraRecipe(loras / f"style{i}.safetensors", rank=args.rank, seed=i) for i in range(ADAPTERS)])
        config = write_stage_config(work, {"lora": {"dir": str(loras), "max_loras": args.max_loras,
                                                    "max_rank": args.rank}}, base=Path(args.stage_config))
        with Cluster(model=model, workdir=work, stage_config=config, num_dit=args.num_dit, worker_metrics=True,
                     start_timeout=1200) as cluster:
            asyncio.run(level(cluster.url, 0, argparse.Namespace(**{**vars(args), "requests": 2}), seed_base=0))  # warm-up
            print(f"{args.requests} requests at {args.concurrency} in flight, {args.size}, {args.steps} steps, "
                  f"{args.num_dit} DiT workers of {args.max_loras} adapter slots, rank {args.rank}")
            print(f"{'adapters':>8} {'images/s':>9} {'vs none':>8} {'loads':>6} {'evictions':>9}")

            def counts() -> tuple[float, float]:
                return (dit_counter(cluster, args.num_dit, "glm_worker_lora_loads_total", outcome="ok"),
                        dit_counter(cluster, args.num_dit, "glm_worker_lora_evictions_total"))

            base = None
            for n, adapters in enumerate(args.levels, start=1):
                before = counts()
                rate = asyncio.run(level(cluster.url, adapters, args, seed_base=n * 100_000))
                loads, evictions = (after - was for after, was in zip(counts(), before))
                base = base or (rate if adapters == 0 else None)
                ratio = f"{rate / base:.3f}" if base else "-"
                print(f"{adapters:>8} {rate:>9.3f} {ratio:>8} {loads:>6.0f} {evictions:>9.0f}")


if __name__ == "__main__":
    main()
