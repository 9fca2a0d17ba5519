"""Cluster-scale capacity of the router, with simulated workers (bench/sim_workers.py).

    .venv/bin/python -m bench.capacity router     # requests/s the router sustains with instant stages
    .venv/bin/python -m bench.capacity dispatch   # throughput with K = 1..64 DiT workers vs K x ideal
    .venv/bin/python -m bench.capacity gpus       # images/s per GPU for 1 AR + N DiT "GPUs" at saturation
    .venv/bin/python -m bench.capacity all --out results.json
    .venv/bin/python -m bench.capacity plan --target 1.0   # GPUs for 1 image/s (arithmetic only)

Every run starts a real router process (`launch.cli router`, HTTP + ZeroMQ bus) and sim worker
processes (timing models, never real models), then drives the router over HTTP with bench/load.py
from this process. On a machine with 2+ cores the router is pinned to CPU 0 and everything else
(the load client and the sim workers) to the other CPUs, so the router's figures are for one core;
the router's own CPU time is read from /proc and reported as CPU milliseconds per request, which
gives the one-core capacity even when the client is what limits the achieved rate. Results are
markdown tables (for docs/capacity.md) with the 1-minute load average at the end of each row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import LoadRunner, RequestSpec
from bench.sim_workers import (
    DEFAULT_BATCH_GROWTH,
    VLLM_OMNI_AR_TOKENS_PER_S,
    VLLM_OMNI_DIT_S_50_STEPS,
    BatchingCurve,
)
from common.sizes import ImageSize, token_layout
from harness.local_cluster import Cluster, write_stage_config

ROOT = Path(__file__).resolve().parent.parent
BASE_STAGE_CONFIG = ROOT / "stage_configs" / "glm_image.yaml"
VLLM_OMNI_S_PER_IMAGE_1GPU = 25.2  # 1024x1024, 50 steps, one H800, one request at a time
TOKENS_1024 = token_layout(ImageSize(1024, 1024), image_to_image=False).tokens_to_generate  # 1281
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_split() -> tuple[set[int] | None, set[int] | None]:
    """(router CPUs, everything else) when this machine has 2+ CPUs available, else (None, None)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` (threads created later inherit the main thread's mask)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, PermissionError):
            pass


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid`, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15 of stat)


def stop_sims(sims: list[subprocess.Popen]) -> None:
    """SIGTERM every sim worker process group, then SIGKILL those still there after 15 s."""
    for popen in sims:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGTERM)
    for popen in sims:
        try:
            popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


@dataclass
class SimCluster:
    """A real router process plus sim worker processes, pinned apart. Use as a context manager."""

    workdir: Path
    router_overrides: dict = field(default_factory=dict)
    router_log_level: str = "INFO"
    router_cpus: set[int] | None = None
    other_cpus: set[int] | None = None
    sims: list[subprocess.Popen] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=lambda: {"ar": 0, "dit": 0})

    def __enter__(self) -> "SimCluster":
        # The product's GPU stage config (1024x1024, 50 steps), with the router settings a load test needs.
        self.config = write_stage_config(self.workdir, {"router": self.router_overrides}, base=BASE_STAGE_CONFIG)
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLM_SERVE_LOG_LEVEL": self.router_log_level}
        self.cluster = Cluster(model=self.workdir, workdir=self.workdir, stage_config=self.config, num_ar=0, num_dit=0,
                               env=env, model_name="sim")
        self.cluster.start_router()
        if self.router_cpus:
            pin_process(self.router_pid, self.router_cpus)
        try:
            self.cluster.wait_for_http(timeout=60)
        except BaseException:
            self.cluster.stop()
            raise
        if self.router_cpus:
            pin_process(self.router_pid, self.router_cpus)  # the threads started since
        return self

    @property
    def router_pid(self) -> int:
        return self.cluster.procs["router"].popen.pid

    @property
    def url(self) -> str:
        return self.cluster.url

    def start_sims(self, stage: str, count: int, *extra: str) -> None:
        """One process hosting `count` sim workers of `stage`; waits until the router sees them."""
        name = f"sim-{stage}-{len(self.sims)}"
        log = open(self.workdir / f"{name}.log", "ab")
        cpus = self.other_cpus
        popen = subprocess.Popen(
            [sys.executable, "-m", "bench.sim_workers", stage, "--router", self.cluster.bus_address,
             "--stage-config", str(self.config), "--count", str(count), "--id-prefix", name, *extra],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        log.close()
        self.sims.append(popen)
        self.expected[stage] += count
        self.cluster.wait_for_workers(self.expected["ar"], self.expected["dit"], timeout=60, exact=True)

    def __exit__(self, *exc) -> None:
        stop_sims(self.sims)
        self.cluster.stop()


def _pin_self(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


async def _measure(sim: SimCluster, spec: RequestSpec, levels: list[int], duration: float, warmup: float,
                   timeout: float = 120.0) -> list[dict[str, Any]]:
    """Closed-loop levels against `sim`, each with the router's CPU time and the load average."""
    runner = LoadRunner(sim.url, spec, timeout_s=timeout, connections=max(levels))
    rows = []
    try:
        await runner.closed_loop(min(levels), 1.0)  # warm the connections and the router's code paths
        for level in levels:
            cpu0, t0 = process_cpu_s(sim.router_pid), time.perf_counter()
            summary = await runner.closed_loop(level, duration, warmup)
            cpu_s, wall_s = process_cpu_s(sim.router_pid) - cpu0, time.perf_counter() - t0
            summary["router_cpu_ms_per_request"] = round(1000 * cpu_s / max(summary["sent"], 1), 3)
            summary["router_cpu_util"] = round(cpu_s / wall_s, 3)
            summary["loadavg_1m"] = round(os.getloadavg()[0], 2)
            rows.append(summary)
            print(json.dumps({k: summary[k] for k in ("level", "images_per_s", "errors", "http_429",
                                                     "router_cpu_ms_per_request", "router_cpu_util", "loadavg_1m")}),
                  file=sys.stderr, flush=True)
    finally:
        await runner.aclose()
    return rows


# ---------------------------------------------------------------------------
# The three experiments.


def router_capacity(args: argparse.Namespace) -> dict[str, Any]:
    """Instant AR and DiT sims: what the router alone sustains, and its CPU cost per request."""
    router_cpus, other_cpus = cpu_split()
    _pin_self(other_cpus)
    overrides = {"queue_limit_per_stage": 4096}
    with tempfile.TemporaryDirectory() as tmp, SimCluster(Path(tmp), overrides, args.router_log_level, router_cpus,
                                                         other_cpus) as sim:
        sim.start_sims("ar", 1, "--tokens-per-s", "inf", "--max-batch", "4096")
        sim.start_sims("dit", args.instant_dit_workers, "--step-s", "0",
                       *(["--noise-image"] if args.noise_image else []))
        spec = RequestSpec(size=args.size, steps=50)
        rows = asyncio.run(_measure(sim, spec, args.concurrency, args.duration, args.warmup))
    lines = ["| concurrency | requests/s | errors | 429 | e2e p50 ms | p99 ms | router CPU ms/request | router CPU use "
             "| one-core capacity (req/s) | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_req = r["router_cpu_ms_per_request"]
        lines.append(f"| {r['level']} | {r['requests_per_s']:.0f} | {r['errors']} | {r['http_429']} | "
                     f"{1000 * r['e2e_s']['p50']:.1f} | {1000 * r['e2e_s']['p99']:.1f} | {per_req:.2f} | "
                     f"{100 * r['router_cpu_util']:.0f}% | {1000 / per_req if per_req else 0:.0f} | {r['loadavg_1m']} |")
    return {"experiment": "router", "rows": rows, "table": "\n".join(lines),
            "router_log_level": args.router_log_level, "pinned": router_cpus is not None}


def dispatch_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """K DiT sims of a fixed job time, AR instant: throughput against K x the ideal."""
    router_cpus, other_cpus = cpu_split()
    _pin_self(other_cpus)
    step_s = args.job_s / 50  # 50 steps at 1024x1024 = job_s
    rows = []
    for k in args.workers:
        with tempfile.TemporaryDirectory() as tmp, SimCluster(Path(tmp), {"queue_limit_per_stage": 4096},
                                                             args.router_log_level, router_cpus, other_cpus) as sim:
            sim.start_sims("ar", 1, "--tokens-per-s", "inf", "--max-batch", "4096")
            sim.start_sims("dit", k, "--step-s", f"{step_s}", "--jitter", f"{args.jitter}")
            concurrency = max(2 * k, 4)  # one job running and one queued per worker
            (row,) = asyncio.run(_measure(sim, RequestSpec(size="1024x1024", steps=50), [concurrency],
                                          args.duration, args.warmup))
        ideal = k / args.job_s
        row.update(workers=k, ideal_images_per_s=ideal, efficiency=round(row["images_per_s"] / ideal, 4))
        rows.append(row)
    lines = ["| DiT workers K | concurrency | images/s | ideal K/job_s | efficiency | errors | e2e p50 s | e2e p99 s "
             "| router CPU use | load avg |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['level']} | {r['images_per_s']:.2f} | {r['ideal_images_per_s']:.1f} | "
                     f"{r['efficiency']:.3f} | {r['errors']} | {r['e2e_s']['p50']:.3f} | {r['e2e_s']['p99']:.3f} | "
                     f"{100 * r['router_cpu_util']:.0f}% | {r['loadavg_1m']} |")
    return {"experiment": "dispatch", "job_s": args.job_s, "rows": rows, "table": "\n".join(lines)}


def predicted_images_per_s(num_dit: int, max_batch: int, curve: BatchingCurve, dit_s: float) -> float:
    """Saturated images/s of 1 AR + `num_dit` DiT GPUs under the timing model (real time)."""
    return min(curve.aggregate(max_batch) / TOKENS_1024, num_dit / dit_s)


def gpu_curve(args: argparse.Namespace) -> dict[str, Any]:
    """1 AR GPU (batching curve) + N DiT GPUs at 1024x1024, 50 steps, saturated; per GPU and vs vLLM-Omni."""
    router_cpus, other_cpus = cpu_split()
    _pin_self(other_cpus)
    scale = args.time_scale
    curve = BatchingCurve(args.tokens_per_s, args.batch_growth)
    rows = []
    for n in args.dit:
        overrides = {"queue_limit_per_stage": 4096}
        with tempfile.TemporaryDirectory() as tmp, SimCluster(Path(tmp), overrides, args.router_log_level, router_cpus,
                                                             other_cpus) as sim:
            sim.start_sims("ar", 1, "--tokens-per-s", f"{args.tokens_per_s}", "--batch-growth", f"{args.batch_growth}",
                           "--max-batch", f"{args.max_batch}", "--time-scale", f"{scale}")
            sim.start_sims("dit", n, "--step-s", f"{args.dit_s / 50}", "--time-scale", f"{scale}",
                           "--jitter", f"{args.jitter}")
            # Enough requests to fill the AR batch and keep every DiT busy with one queued behind it.
            concurrency = args.max_batch + 2 * n
            (row,) = asyncio.run(_measure(sim, RequestSpec(size="1024x1024", steps=50), [concurrency],
                                          args.duration, args.warmup, timeout=600))
        real = row["images_per_s"] / scale
        gpus = 1 + n
        predicted = predicted_images_per_s(n, args.max_batch, curve, args.dit_s)
        row.update(dit_gpus=n, gpus=gpus, real_images_per_s=round(real, 4), per_gpu=round(real / gpus, 4),
                   predicted_images_per_s=round(predicted, 4),
                   real_e2e_p50_s=round(row["e2e_s"]["p50"] * scale, 1) if row["e2e_s"]["p50"] else None,
                   vs_vllm_omni=round((real / gpus) * VLLM_OMNI_S_PER_IMAGE_1GPU, 2))
        rows.append(row)
    best = max(rows, key=lambda r: r["per_gpu"])
    lines = ["| AR:DiT GPUs | GPUs | images/s (measured) | images/s (model) | images/s per GPU | x vLLM-Omni per GPU "
             "| mean latency s (C/X) | AR job p50 s | DiT job p50 s | errors | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def real_s(part: str) -> str:
            v = r[f"{part}_s"]["p50"]
            return "-" if v is None else f"{v * scale:.1f}"

        # Little's law: in a closed loop the mean latency is concurrency / throughput, whatever the
        # order the router serves its queue in (latency percentiles of a sample depend on that order).
        little = r["level"] / r["real_images_per_s"] if r["real_images_per_s"] else float("nan")
        lines.append(f"| 1:{r['dit_gpus']} | {r['gpus']} | {r['real_images_per_s']:.3f} | "
                     f"{r['predicted_images_per_s']:.3f} | **{r['per_gpu']:.4f}** | {r['vs_vllm_omni']:.2f} | "
                     f"{little:.0f} (C={r['level']}) | {real_s('ar')} | {real_s('dit')} | {r['errors']} | "
                     f"{r['loadavg_1m']} |")
    return {"experiment": "gpus", "time_scale": scale, "tokens_per_s": args.tokens_per_s,
            "batch_growth": args.batch_growth, "max_batch": args.max_batch, "dit_s": args.dit_s,
            "vllm_omni_per_gpu": round(1 / VLLM_OMNI_S_PER_IMAGE_1GPU, 4), "best_ratio": f"1:{best['dit_gpus']}",
            "best_per_gpu": best["per_gpu"], "rows": rows, "table": "\n".join(lines)}


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The sizing guide as arithmetic: AR and DiT GPUs for `--target` images/s under the timing model.

    DiT GPUs: enough that each is busy at most `--utilization` of the time (headroom for bursts and
    latency). AR GPUs: enough that the batched AR keeps up at `--max-batch`. No processes are run."""
    curve = BatchingCurve(args.tokens_per_s, args.batch_growth)
    tokens = token_layout(ImageSize.parse(args.size), image_to_image=False).tokens_to_generate
    pixels = ImageSize.parse(args.size).width * ImageSize.parse(args.size).height / (1024 * 1024)
    dit_s = args.dit_s * pixels * args.steps / 50
    ar_images_per_s = curve.aggregate(args.max_batch) / tokens
    dit_gpus = max(1, math.ceil(args.target * dit_s / args.utilization))
    ar_gpus = max(1, math.ceil(args.target / (ar_images_per_s * args.utilization)))
    capacity = min(ar_gpus * ar_images_per_s, dit_gpus / dit_s)
    lines = [
        f"target {args.target:g} images/s at {args.size}, {args.steps} steps, utilization <= {args.utilization:g}:",
        f"  one DiT GPU: {dit_s:.1f} s per image = {1 / dit_s:.4f} images/s",
        f"  one AR GPU at batch {args.max_batch}: {curve.aggregate(args.max_batch):.0f} tokens/s "
        f"({curve.aggregate(args.max_batch) / curve.tokens_per_s:.2f}x batch 1) / {tokens} tokens = "
        f"{ar_images_per_s:.3f} images/s (feeds {ar_images_per_s * dit_s:.1f} DiT GPUs)",
        f"  => {ar_gpus} AR + {dit_gpus} DiT GPUs = {ar_gpus + dit_gpus} GPUs; saturated capacity "
        f"{capacity:.3f} images/s = {capacity / (ar_gpus + dit_gpus):.4f} per GPU",
    ]
    return {"experiment": "plan", "ar_gpus": ar_gpus, "dit_gpus": dit_gpus, "capacity": capacity, "table": "\n".join(lines)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["router", "dispatch", "gpus", "all", "plan"],
                        help="plan: how many GPUs for --target images/s (arithmetic, runs nothing)")
    parser.add_argument("--out", help="write the results (rows and tables) to this JSON file")
    parser.add_argument("--router-log-level", default="INFO", help="the router's log level (default: %(default)s, the product's)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per level (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per level before measuring (default: %(default)s)")
    r = parser.add_argument_group("router")
    r.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    r.add_argument("--instant-dit-workers", type=int, default=16)
    r.add_argument("--size", default="1024x1024")
    r.add_argument("--noise-image", action="store_true", help="DiT sims return incompressible images (worst-case payload)")
    d = parser.add_argument_group("dispatch")
    d.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    d.add_argument("--job-s", type=float, default=0.5, help="seconds per DiT job (default: %(default)s)")
    g = parser.add_argument_group("gpus")
    g.add_argument("--dit", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8])
    g.add_argument("--time-scale", type=float, default=20.0, help="sim speed-up; results are scaled back (default: %(default)s)")
    g.add_argument("--tokens-per-s", type=float, default=VLLM_OMNI_AR_TOKENS_PER_S)
    g.add_argument("--batch-growth", type=float, default=DEFAULT_BATCH_GROWTH)
    g.add_argument("--max-batch", type=int, default=32)
    g.add_argument("--dit-s", type=float, default=VLLM_OMNI_DIT_S_50_STEPS, help="seconds per 1024x1024 50-step image")
    p = parser.add_argument_group("plan (also uses the gpus options)")
    p.add_argument("--target", type=float, default=1.0, help="images/s to serve (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--utilization", type=float, default=0.8, help="the busiest a GPU may be (default: %(default)s)")
    parser.add_argument("--jitter", type=float, default=0.1,
                        help="DiT job times spread +-this fraction, mean kept (default: %(default)s)")
    g.add_argument("--gpu-warmup", type=float, default=20.0, help="warm-up (scaled seconds) for the gpus experiment")
    g.add_argument("--gpu-duration", type=float, default=60.0, help="measured scaled seconds for the gpus experiment")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the chosen experiment(s); print the tables; optionally save everything as JSON."""
    args = build_parser().parse_args(argv)
    if args.experiment == "plan":
        print(plan(args)["table"])
        return
    experiments = {"router": router_capacity, "dispatch": dispatch_scaling, "gpus": gpu_curve}
    chosen = list(experiments) if args.experiment == "all" else [args.experiment]
    results = []
    for name in chosen:
        run_args = args
        if name == "gpus":
            run_args = argparse.Namespace(**{**vars(args), "duration": args.gpu_duration, "warmup": args.gpu_warmup})
        print(f"== {name} (load average {os.getloadavg()[0]:.2f} before)", flush=True)
        result = experiments[name](run_args)
        print(result["table"], flush=True)
        results.append(result)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
