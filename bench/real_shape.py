"""Time and peak resident memory per worker at the released model's shapes (1 layer per stack).

    .venv/bin/python -m bench.real_shape --size 1024x1024 --steps 2 [--engine vllm]

Builds (or reuses) the real-shape model (`model_presets/tiny_model.py`, preset "real-shape", bfloat16),
starts the router, one AR worker and one DiT worker as processes (`harness.local_cluster`), sends
one warm-up and then `--repeats` text-to-image requests, and prints, per request, the wall time and
the router's AR/DiT split, and per process its peak resident set (VmHWM from /proc/<pid>/status,
summed over the process and its children: vLLM runs its engine core in a child). Results go in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from harness.local_cluster import Cluster, write_stage_config
from model_presets.tiny_model import REAL_SHAPE, build_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid
            child = int(stat.parent.name)
            out += [child, *_children(child)]
    return out


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of `pid` plus its descendants, in MiB."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "real-shape-glm-image"))
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=2, help="num_inference_steps")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers", help="AR engine")
    parser.add_argument("--threads", type=int, default=1, help="math threads per worker (OMP_NUM_THREADS)")
    args = parser.parse_args()

    started = time.perf_counter()
    model = build_tiny_model(args.model, preset="real-shape")
    print(f"model: {model} (built or reused in {time.perf_counter() - started:.0f} s)")
    ar_args: dict = {"dtype": "bfloat16"}
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.engine == "vllm":
        # One layer, 2 KV heads of 128 in bfloat16: 1 KiB a token, 65536 tokens.
        ar_args.update(max_num_seqs=1, enforce_eager=True, kv_cache_memory_bytes=64 << 20)
    stages = {"stage_args": [
        {"engine": args.engine, "engine_args": ar_args,
         "default_sampling_params": {"temperature": REAL_SHAPE.temperature, "top_p": REAL_SHAPE.top_p,
                                     "top_k": REAL_SHAPE.vision_vocab_size}},
        {"engine_args": {"dtype": "bfloat16"}},
    ]}
    with tempfile.TemporaryDirectory() as tmp:
        config = write_stage_config(Path(tmp), stages)
        load_started = time.perf_counter()
        with Cluster(model=model, workdir=Path(tmp), stage_config=config, model_name="glm-image-real-shape",
                     start_timeout=900, env=env) as cluster:
            print(f"cluster ready in {time.perf_counter() - load_started:.0f} s; "
                  f"peak RSS after load (MiB): " + ", ".join(
                      f"{name} {peak_rss_mib(p.popen.pid):.0f}" for name, p in cluster.procs.items()))
            client = httpx.Client(base_url=cluster.url, timeout=3600)
            client.post("/v1/images/generations", json={"prompt": "warm-up", "size": "256x256",
                                                         "num_inference_steps": 1, "seed": 0}).raise_for_status()
            totals, ars, dits = [], [], []
            for i in range(args.repeats):
                t0 = time.perf_counter()
                r = client.post("/v1/images/generations", json={"prompt": 'a lighthouse, "GLM" painted on it',
                                                                 "size": args.size, "seed": i,
                                                                 "num_inference_steps": args.steps})
                r.raise_for_status()
                totals.append(time.perf_counter() - t0)
                timing = r.json()["timings"][0]
                ars.append(timing["ar_s"])
                dits.append(timing["dit_s"])
                print(f"request {i}: {totals[-1]:.1f} s (AR {ars[-1]:.1f} s, DiT {dits[-1]:.1f} s)")
            rss = {name: peak_rss_mib(p.popen.pid) for name, p in cluster.procs.items()}
    print()
    print("| size | AR engine | steps | end to end s | AR s | DiT s | router MiB | AR worker MiB | DiT worker MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.size} | {args.engine} | {args.steps} | {statistics.median(totals):.1f} | "
          f"{statistics.median(ars):.1f} | {statistics.median(dits):.1f} | {rss['router']:.0f} | "
          f"{rss['ar-0']:.0f} | {rss['dit-0']:.0f} |")


if __name__ == "__main__":
    main()
