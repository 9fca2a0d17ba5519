"""AR throughput of the two AR engines behind the same interface (512x512 text-to-image).

For each concurrency c, c requests are submitted at once to the engine; we report generated
tokens/s and requests/s over the wall time until the last one finishes. The transformers
engine runs one request at a time (the seeded global RNG makes it serial); the vLLM engine
batches them continuously.

    .venv/bin/python -m bench.ar_engines --levels 1,4,16
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from common.sizes import ImageSize, token_layout
from common.stage_config import AREngineArgs
from model_presets.tiny_model import build_tiny_model
from stage_ar.engine import AREngine, ARGenerationRequest

ROOT = Path(__file__).resolve().parent.parent
SIZE = 512
PROMPT = "a lighthouse on a cliff at sunset"


def make_engine(name: str, model: str, max_num_seqs: int, gpu_memory_utilization: float) -> AREngine:
    args = AREngineArgs(dtype="float32", max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_memory_utilization)
    if name == "vllm":
        from stage_ar.vllm_engine import VllmAREngine

        return VllmAREngine(model, args, "cpu")
    from stage_ar.transformers_engine import TransformersAREngine

    return TransformersAREngine(model, args, "cpu")


async def bench(name: str, model: str, levels: list[int], gpu_memory_utilization: float) -> list[tuple[int, float, float]]:
    # Built inside the running loop: vLLM's AsyncLLM attaches to it.
    engine = make_engine(name, model, max(levels), gpu_memory_utilization)
    rows = []
    try:
        # Warm-up keeps first-step compilation and allocation out of the numbers.
        await engine.generate(ARGenerationRequest("warmup", PROMPT, ImageSize(SIZE, SIZE)))
        for c in levels:
            requests = [ARGenerationRequest(f"c{c}-{i}", f"{PROMPT} {i}", ImageSize(SIZE, SIZE), seed=i) for i in range(c)]
            started = time.perf_counter()
            outputs = await asyncio.gather(*(engine.generate(r) for r in requests))
            elapsed = time.perf_counter() - started
            tokens = sum(len(o.generated_token_ids) for o in outputs)
            rows.append((c, tokens / elapsed, c / elapsed))
    finally:
        await engine.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-glm-image"), help="GLM-Image folder (built tiny if missing)")
    parser.add_argument("--levels", default="1,4,16", help="comma list of concurrency levels")
    parser.add_argument("--engines", default="transformers,vllm")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.15, help="vLLM; on CPU a fraction of RAM")
    args = parser.parse_args()
    build_tiny_model(args.model)
    levels = [int(x) for x in args.levels.split(",")]
    results = {name: asyncio.run(bench(name, args.model, levels, args.gpu_memory_utilization)) for name in args.engines.split(",")}
    print(f"\n{SIZE}x{SIZE} text-to-image, {token_layout(ImageSize(SIZE, SIZE), False).tokens_to_generate} tokens per request")
    print("| engine | concurrency | tokens/s | requests/s |\n|---|---|---|---|")
    for name, rows in results.items():
        for c, tps, rps in rows:
            print(f"| {name} | {c} | {tps:.0f} | {rps:.2f} |")


if __name__ == "__main__":
    main()
