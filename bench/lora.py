"""What a LoRA adapter costs a DiT worker at GLM-Image's released DiT shape: loading one, and
the compiled DiT's hot-swap slots.

    .venv/bin/python -m bench.lora --device cpu --dtype bfloat16 --ranks 16 64 --repeats 5
    .venv/bin/python -m bench.lora --device cuda --dtype bfloat16 --ranks 16 64 128

Runs the DiT worker's own adapter code (`stage_dit/lora.py`: `LoraManager`, what a worker runs) on
a transformer of the released shape (bench.dit_batching.REAL_SHAPE: 30 blocks, 4096 hidden, ~7B).
The base weights are allocated but never written nor read (loading an adapter does not look at
them), so on a CPU this needs no 14 GB of memory. Adapters are random, saved as diffusers saves
them, on the attention projections of every block (`attn`) or on every linear layer (`all`).

Prints per rank: the file size, the time to read, check and inject one adapter (the first job that
needs it on a worker pays this once), to evict one, and for the compiled DiT the time to make the
slots (at start) and to hot-swap an adapter into one, with the slots' weight memory.
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.dit_batching import REAL_SHAPE
from common.lora import inspect_file
from common.protocol import LoraSpec
from common.stage_config import LoraSettings
from stage_dit.lora import LoraManager, linear_layers

ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")


def transformer(device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The released DiT shape with unwritten weights (allocated, never touched)."""
    from diffusers import GlmImageTransformer2DModel

    with torch.device("meta"):
        model = GlmImageTransformer2DModel(**REAL_SHAPE).to(dtype)  # cast on meta: a cast reads every weight
    return model.to_empty(device=device).eval()


def write_adapter(path: Path, linears: list[tuple[str, int, int]], rank: int, targets: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, fan_in, fan_out in linears:
        if targets == "attn" and not name.endswith(ATTENTION):
            continue
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) / rank
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(path))


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--targets", choices=["attn", "all"], default="attn")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slots", type=int, default=2, help="max_loras for the hot-swap slots (default: %(default)s)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"released DiT shape on {args.device} ({args.dtype}), adapters on {args.targets} linear layers")
    for rank in args.ranks:
        base = transformer(args.device, dtype)
        linears = linear_layers(base)
        for i in range(args.repeats + 1):
            write_adapter(folder / f"r{rank}_{i}.safetensors", linears, rank, args.targets, seed=i)
        settings = LoraSettings(dir=str(folder), max_loras=1, max_rank=max(args.ranks), max_file_bytes=1 << 34)
        specs = []
        for i in range(args.repeats + 1):
            lora = inspect_file(folder, f"r{rank}_{i}.safetensors", settings.max_rank, settings.max_file_bytes)
            specs.append(LoraSpec(name=f"r{rank}_{i}", path=lora.relative, digest=lora.digest, scale=1.0))
        size_mb = (folder / f"r{rank}_0.safetensors").stat().st_size / 1e6

        manager = LoraManager(base, folder, settings)
        # max_loras 1: each load after the first evicts the previous adapter (delete_adapters).
        loads = [timed(lambda s=s: (manager.activate([s], "bench"), sync())) for s in specs]
        eager_load = statistics.median(loads[1:])
        del manager, base  # one transformer at a time: each is 14 GB of address space
        gc.collect()

        base = transformer(args.device, dtype)
        slot_settings = settings.model_copy(update={"max_loras": args.slots, "max_rank": rank})
        made = time.perf_counter()
        slots = LoraManager(base, folder, slot_settings, compiled=True)
        sync()
        made = time.perf_counter() - made
        slot_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "lora_" in n)
        swaps = [timed(lambda s=s: (slots.activate([s], "bench"), sync())) for s in specs]
        print(f"rank {rank:4d}: file {size_mb:7.1f} MB; load {eager_load * 1000:7.1f} ms (median of {len(loads) - 1}, "
              f"first {loads[0] * 1000:.1f} ms, each evicting the previous); compiled DiT: {args.slots} slots of rank "
              f"{rank} on every linear layer made in {made:.2f} s, {slot_bytes / 2**30:.2f} GiB, hot swap "
              f"{statistics.median(swaps) * 1000:.1f} ms")
        del base, slots
        gc.collect()


if __name__ == "__main__":
    main()
