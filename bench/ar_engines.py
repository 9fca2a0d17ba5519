"""AR throughput: the vLLM engine vs a plain transformers generate loop (512x512 text-to-image).

For each concurrency c, c requests are submitted at once; we report generated
tokens/s and requests/s over the wall time until the last one finishes. The
transformers loop runs them one after another (plain `generate`, batch size 1),
with the same grid mask the engines apply.

Run with the vLLM venv:
    .venv-vllm/bin/python -m bench.ar_engines --model /tmp/tiny_glm_image
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from common.sizes import token_layout
from common.stage_config import EngineArgs
from stage_ar.engine import ARGenerationRequest

SIZE = 512
PROMPT = "a lighthouse on a cliff at sunset"


def bench_vllm(model: str, levels: list[int], gpu_memory_utilization: float) -> list[tuple[int, float, float]]:
    from stage_ar.vllm_engine import VllmAREngine

    async def run() -> list[tuple[int, float, float]]:
        args = EngineArgs(
            dtype="float32", max_num_seqs=max(levels), gpu_memory_utilization=gpu_memory_utilization
        )
        engine = VllmAREngine(model, args, "cpu")
        rows = []
        try:
            # Warm-up: first-step compilation and allocation stay out of the numbers.
            await engine.generate(ARGenerationRequest("warmup", PROMPT, SIZE, SIZE))
            for c in levels:
                reqs = [ARGenerationRequest(f"c{c}-{i}", f"{PROMPT} {i}", SIZE, SIZE, seed=i) for i in range(c)]
                t0 = time.perf_counter()
                outs = await asyncio.gather(*(engine.generate(r) for r in reqs))
                dt = time.perf_counter() - t0
                tokens = sum(len(o.generated_token_ids) for o in outs)
                rows.append((c, tokens / dt, c / dt))
        finally:
            await engine.shutdown()
        return rows

    return asyncio.run(run())


def bench_transformers(model: str, levels: list[int]) -> list[tuple[int, float, float]]:
    from transformers import AutoProcessor, GlmImageForConditionalGeneration, LogitsProcessor, LogitsProcessorList

    processor = AutoProcessor.from_pretrained(model, subfolder="processor")
    ar = GlmImageForConditionalGeneration.from_pretrained(model, subfolder="vision_language_encoder").eval()
    codebook, eos = ar.config.vq_config.num_embeddings, ar.config.image_end_token_id
    total = token_layout(SIZE, SIZE, image_to_image=False).tokens_to_generate

    class GridMask(LogitsProcessor):
        def __init__(self, prompt_len: int) -> None:
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores):
            mask = torch.full_like(scores, float("-inf"))
            if input_ids.shape[1] - self.prompt_len < total - 1:
                mask[:, :codebook] = 0
            else:
                mask[:, eos] = 0
            return scores + mask

    def one(prompt: str, seed: int) -> int:
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
            tokenize=True, target_h=SIZE, target_w=SIZE, return_dict=True, return_tensors="pt",
        )
        n = inputs["input_ids"].shape[1]
        torch.manual_seed(seed)
        with torch.no_grad():
            out = ar.generate(
                **inputs, do_sample=True, temperature=0.9, top_p=0.75, max_new_tokens=total,
                suppress_tokens=[], logits_processor=LogitsProcessorList([GridMask(n)]),
            )
        return out.shape[1] - n

    one("warmup", 0)
    rows = []
    for c in levels:
        t0 = time.perf_counter()
        tokens = sum(one(f"{PROMPT} {i}", i) for i in range(c))
        dt = time.perf_counter() - t0
        rows.append((c, tokens / dt, c / dt))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="GLM-Image folder (diffusers layout); built tiny if missing")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.15)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    from launch.tiny_model import build_tiny_model

    build_tiny_model(args.model)
    levels = [int(x) for x in args.levels.split(",")]
    results = {"vllm": bench_vllm(args.model, levels, args.gpu_memory_utilization)}
    if not args.skip_transformers:
        results["transformers"] = bench_transformers(args.model, levels)
    print(f"\n512x512 text-to-image, {token_layout(SIZE, SIZE, False).tokens_to_generate} tokens per request")
    print("| engine | concurrency | tokens/s | requests/s |\n|---|---|---|---|")
    for name, rows in results.items():
        for c, tps, rps in rows:
            print(f"| {name} | {c} | {tps:.0f} | {rps:.2f} |")


if __name__ == "__main__":
    main()
