"""The scheduler under load: overload admission, several routers, service tiers (docs/scheduling.md).

    .venv/bin/python -m bench.scheduling overload --duration 120 --out overload.json
    .venv/bin/python -m bench.scheduling routers
    .venv/bin/python -m bench.scheduling priority
    .venv/bin/python -m bench.scheduling all --out results.json

Every run starts real router processes (`python -m launch.cli router`, via harness.local_cluster's
Cluster) and simulated workers (`python -m bench.sim_workers`: the real worker runtime, a timing
model instead of the model), and drives the routers over real HTTP from this process with
bench/load.py's keep-alive client. The default fleet is 1 AR worker (batch up to 8) and 2 DiT
workers: the "latency matters" pairing of docs/capacity.md, DiT-bound at 2 / 10.6 s = 0.189
images/s at 1024x1024, 50 steps.

Time. The sims run `--time-scale` (default 10) times faster than the GPUs they model, and every
router setting that is a duration of the model's world is divided by the same factor in the stage
config (`request_deadline_s`, `max_queue_wait_s`, `priority_aging_s`), so the flags below are all
in model ("GPU") seconds and so are the latencies of admitted requests in the results (measured
wall time x the scale). What does not scale: the router's own constants (1 s heartbeats, the
0.5 s re-check of a waiting job) and the cost of HTTP; a 429's latency is reported in wall
milliseconds, as measured. `--duration` and the other run lengths are wall seconds.

The runs and their targets:

1. overload: Poisson arrivals at `--load-factor` (3) x the fleet's modelled throughput for
   `--duration` (120) wall seconds, with `request_deadline_s` = `--deadline` (60 model s) and
   `max_queue_wait_s` = `--max-queue-wait` (20 model s). After `--warmup-requests` (1) sequential
   request (so the router knows its job times; without one the wait estimate is off until the
   first job ends), it reports: requests admitted, and how many of those failed with a deadline
   error (504; target 0); requests refused with 429, the p50/p99 latency of a 429 (target p99 <
   50 ms) and whether each had a Retry-After header (target: all); p50/p99 latency of the
   admitted requests; and the images/s served, against the modelled capacity.
2. routers: the same workers behind 1 router, then behind 2 (every worker joined to both, the
   `--clients` (16) closed-loop clients split evenly between them), `--routers-warmup` (10) +
   `--routers-duration` (60) wall seconds each. Throughput ratio two/one (target >= 0.95) and 5xx
   responses (target 0).
3. priority: two API keys in an `--api-key-file` (`KEY name=batch tier=flex`, `KEY
   name=interactive tier=priority`; the requests send no service_tier, so the keys' tiers apply).
   First `--baseline-requests` (10) interactive requests one at a time on the idle fleet; then
   `--batch-clients` (16) closed-loop "batch" clients flood it for `--priority-duration` (120)
   wall seconds while, after the first `--priority-warmup` (10), the interactive tenant sends one
   request at a time. Reports interactive p50/p99 under the flood against the idle baseline, the
   batch tenant's images/s, and the images admitted per tier and tenant from the router's
   /metrics (proof that the key attributes were applied). There is no pass/fail target; the
   timing model's floor is given for reference: a priority request can be first in every line,
   but it still decodes in an AR batch that flex requests keep full, so its AR part takes the
   full-batch time (37 s at batch 8) instead of batch 1's 14 s.

No CPU pinning: on a 2-core machine the routers, the sims and this client share both cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.capacity import BASE_STAGE_CONFIG, ROOT, TOKENS_1024, stop_sims
from bench.load import KeepAliveClient, RequestSpec
from bench.sim_workers import DEFAULT_BATCH_GROWTH, VLLM_OMNI_AR_TOKENS_PER_S, VLLM_OMNI_DIT_S_50_STEPS, BatchingCurve
from harness.local_cluster import Cluster, write_stage_config

SPEC = RequestSpec(size="1024x1024", steps=50)  # the calibration point of the timing model


@dataclass
class Outcome:
    """One request as the client saw it; times in wall seconds from the run's start."""

    who: str  # the client group: "open", "router-0", "batch", "interactive", ...
    started: float
    ended: float
    status: int  # 0: no HTTP answer
    images: int = 0
    retry_after: str | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.ended - self.started


async def send(client: KeepAliveClient, who: str, index: int, t0: float) -> Outcome:
    """One 1024x1024, 50-step request; never raises."""
    started = time.perf_counter() - t0
    status, images, retry_after, error = 0, 0, None, None
    try:
        status, headers, payload = await client.post_json_with_headers(SPEC.path, SPEC.body(index))
        retry_after = headers.get("retry-after")
        if status == 200:
            images = len(json.loads(payload).get("data") or [])
        else:
            error = payload[:300].decode("utf-8", "replace")
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:300]
    return Outcome(who, started, time.perf_counter() - t0, status, images, retry_after, error)


async def open_loop(client: KeepAliveClient, rate: float, duration_s: float, t0: float, seed: int = 0) -> list[Outcome]:
    """Poisson arrivals at `rate`/s for `duration_s`, whatever the answers; waits for the last ones."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task] = []
    next_at = rng.expovariate(rate)
    while next_at < duration_s:
        delay = next_at - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(client, "open", len(tasks), t0)))
        next_at += rng.expovariate(rate)
    return list(await asyncio.gather(*tasks))


async def closed_loop(client: KeepAliveClient, who: str, clients: int, stop_at: float, t0: float,
                      start_at: float = 0.0) -> list[Outcome]:
    """`clients` clients sending back to back from `start_at` until `stop_at` (run seconds)."""
    out: list[Outcome] = []

    async def one(c: int) -> None:
        await asyncio.sleep(max(0.0, start_at - (time.perf_counter() - t0)))
        i = 0
        while time.perf_counter() - t0 < stop_at:
            out.append(await send(client, who, c * 100_000 + i, t0))
            i += 1

    await asyncio.gather(*(one(c) for c in range(clients)))
    return out


def pct(values: list[float], p: float, scale: float = 1.0) -> float | None:
    return None if not values else round(float(np.percentile(values, p)) * scale, 4)


def images_per_s(outcomes: list[Outcome], w0: float, w1: float) -> float:
    """Images of the 200s that ended inside [w0, w1], per wall second."""
    return sum(o.images for o in outcomes if o.status == 200 and w0 <= o.ended <= w1) / (w1 - w0)


# ---------------------------------------------------------------------------
# The fleet: router processes and sim worker processes.


def modelled_images_per_s(args: argparse.Namespace) -> float:
    """Saturated images/s of the fleet under the timing model (model time, 1024x1024, 50 steps)."""
    curve = BatchingCurve(args.tokens_per_s, args.batch_growth)
    return min(args.ar_workers * curve.aggregate(args.max_batch) / TOKENS_1024, args.dit_workers / args.dit_s)


def scaled_router_settings(args: argparse.Namespace, **model_seconds: float | None) -> dict[str, float]:
    """Router settings given in model seconds, divided by the time scale (None: left at the default)."""
    return {name: value / args.time_scale for name, value in model_seconds.items() if value is not None}


class Fleet:
    """`routers` router processes sharing one stage config, and the sim workers joined to every one.

    Routers are started with harness.local_cluster.Cluster (one Cluster per router, no workers of
    its own); the sim processes like bench.capacity.SimCluster starts them, with one `--router` per
    router. A context manager: everything it started is stopped on exit."""

    def __init__(self, workdir: Path, args: argparse.Namespace, router_settings: dict, routers: int = 1,
                 router_args: list[str] | None = None):
        self.workdir, self.args, self.count = workdir, args, routers
        self.router_settings, self.router_args = router_settings, router_args or []
        self.routers: list[Cluster] = []
        self.sims: list[subprocess.Popen] = []

    def __enter__(self) -> "Fleet":
        a = self.args
        try:
            self.config = write_stage_config(self.workdir, {"router": self.router_settings}, base=BASE_STAGE_CONFIG)
            env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLM_SERVE_LOG_LEVEL": a.router_log_level}
            for i in range(self.count):
                (self.workdir / f"router-{i}").mkdir()
                cluster = Cluster(model=self.workdir, workdir=self.workdir / f"router-{i}", stage_config=self.config,
                                  num_ar=0, num_dit=0, env=env, model_name="sim")
                self.routers.append(cluster)
                cluster.start_router(self.router_args)
            for cluster in self.routers:
                cluster.wait_for_http(timeout=60)
            scale = ["--time-scale", f"{a.time_scale}"]
            self._start_sims("ar", a.ar_workers, "--tokens-per-s", f"{a.tokens_per_s}", "--batch-growth",
                             f"{a.batch_growth}", "--max-batch", f"{a.max_batch}", *scale)
            self._start_sims("dit", a.dit_workers, "--step-s", f"{a.dit_s / 50}", "--jitter", f"{a.jitter}", *scale)
            for cluster in self.routers:
                cluster.wait_for_workers(a.ar_workers, a.dit_workers, timeout=60, exact=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_sims(self, stage: str, count: int, *extra: str) -> None:
        routers = [arg for c in self.routers for arg in ("--router", c.bus_address)]
        with open(self.workdir / f"sim-{stage}.log", "ab") as log:
            self.sims.append(subprocess.Popen(
                [sys.executable, "-m", "bench.sim_workers", stage, *routers, "--stage-config", str(self.config),
                 "--count", str(count), "--id-prefix", f"sim-{stage}", *extra],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.routers]

    def __exit__(self, *exc) -> None:
        stop_sims(self.sims)
        for cluster in self.routers:
            cluster.stop()


def request_timeout_s(args: argparse.Namespace, deadline_model_s: float) -> float:
    return deadline_model_s / args.time_scale + 60.0


# ---------------------------------------------------------------------------
# 1. overload


async def _overload(fleet: Fleet, args: argparse.Namespace, rate: float) -> tuple[list[Outcome], list[Outcome]]:
    client = KeepAliveClient(fleet.urls[0], request_timeout_s(args, args.deadline), connections=256)
    try:
        t0 = time.perf_counter()
        warm = [await send(client, "warmup", -1 - i, t0) for i in range(args.warmup_requests)]
        t0 = time.perf_counter()
        return warm, await open_loop(client, rate, args.duration, t0)
    finally:
        await client.aclose()


def overload(args: argparse.Namespace) -> dict[str, Any]:
    """Open loop at `load_factor` x capacity with a deadline and max_queue_wait_s (see the module docstring)."""
    s = args.time_scale
    capacity = modelled_images_per_s(args)
    rate = args.load_factor * capacity * s  # wall requests/s
    settings = scaled_router_settings(args, request_deadline_s=args.deadline, max_queue_wait_s=args.max_queue_wait,
                                      priority_aging_s=args.priority_aging)
    with tempfile.TemporaryDirectory() as tmp, Fleet(Path(tmp), args, settings) as fleet:
        warm, out = asyncio.run(_overload(fleet, args, rate))
    rejected = [o for o in out if o.status == 429]
    admitted = [o for o in out if o.status not in (0, 429)]
    ok = [o for o in admitted if o.status == 200]
    deadline = [o for o in admitted if o.status == 504]
    other = [o for o in out if o.status not in (200, 429, 504)]
    retry_after = [int(o.retry_after) for o in rejected if o.retry_after and o.retry_after.isdigit()]
    lat_429 = [o.latency for o in rejected]
    lat_ok = [o.latency for o in ok]
    result = {
        "run": "overload", "time_scale": s, "modelled_images_per_s": round(capacity, 4),
        "offered_requests_per_s_model": round(rate / s, 4), "offered_requests_per_s_wall": round(rate, 3),
        "duration_wall_s": args.duration, "deadline_model_s": args.deadline, "max_queue_wait_model_s": args.max_queue_wait,
        "router_settings_wall": settings, "warmup_requests_ok": sum(o.status == 200 for o in warm),
        "sent": len(out), "admitted": len(admitted), "ok": len(ok), "deadline_errors_504": len(deadline),
        "other_failures": len(other), "first_other_failure": other[0].error if other else None,
        "rejected_429": len(rejected), "rejected_with_retry_after": len(retry_after),
        "retry_after_s_min_p50_max": [min(retry_after), int(np.median(retry_after)), max(retry_after)] if retry_after else None,
        "latency_429_ms": {"p50": pct(lat_429, 50, 1000), "p99": pct(lat_429, 99, 1000), "max": pct(lat_429, 100, 1000)},
        "latency_ok_model_s": {"p50": pct(lat_ok, 50, s), "p99": pct(lat_ok, 99, s), "max": pct(lat_ok, 100, s)},
        "served_images_per_s_model": round(images_per_s(out, 0.0, args.duration) / s, 4),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    r = result
    misses = []
    if r["deadline_errors_504"]:
        misses.append("deadline errors")
    if r["latency_429_ms"]["p99"] is not None and r["latency_429_ms"]["p99"] >= 50:
        misses.append("429 p99 >= 50 ms")
    if r["rejected_with_retry_after"] != r["rejected_429"]:
        misses.append("429 without Retry-After")
    r["targets_missed"] = misses
    lines = ["| offered req/s (model) | sent | admitted | ok | 504 deadline | other errors | 429 | with Retry-After "
             "| 429 p50 / p99 ms | admitted p50 / p99 s (model) | served img/s (model) / capacity | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {r['offered_requests_per_s_model']:.3f} ({args.load_factor:g}x {capacity:.3f}) | {r['sent']} | "
             f"{r['admitted']} | {r['ok']} | **{r['deadline_errors_504']}** | {r['other_failures']} | {r['rejected_429']} | "
             f"{r['rejected_with_retry_after']} | {_f(r['latency_429_ms']['p50'], 1)} / **{_f(r['latency_429_ms']['p99'], 1)}** | "
             f"{_f(r['latency_ok_model_s']['p50'], 1)} / {_f(r['latency_ok_model_s']['p99'], 1)} | "
             f"{r['served_images_per_s_model']:.3f} / {capacity:.3f} | {r['loadavg_1m']} |"]
    result["table"] = "\n".join(lines)
    return result


# ---------------------------------------------------------------------------
# 2. routers


async def _saturate(fleet: Fleet, args: argparse.Namespace) -> list[Outcome]:
    n = len(fleet.urls)
    clients = [KeepAliveClient(url, request_timeout_s(args, args.routers_deadline), connections=args.clients) for url in fleet.urls]
    stop_at = args.routers_warmup + args.routers_duration
    try:
        t0 = time.perf_counter()
        # Client c goes to router c % n: the load split evenly.
        runs = [closed_loop(client, f"router-{i}", len(range(i, args.clients, n)), stop_at, t0)
                for i, client in enumerate(clients)]
        return [o for part in await asyncio.gather(*runs) for o in part]
    finally:
        for client in clients:
            await client.aclose()


def routers(args: argparse.Namespace) -> dict[str, Any]:
    """1 router vs 2 routers over the same workers, closed loop at saturation (see the module docstring)."""
    s = args.time_scale
    settings = scaled_router_settings(args, request_deadline_s=args.routers_deadline, priority_aging_s=args.priority_aging)
    w0, w1 = args.routers_warmup, args.routers_warmup + args.routers_duration
    rows = []
    for count in (1, 2):
        with tempfile.TemporaryDirectory() as tmp, Fleet(Path(tmp), args, settings, routers=count) as fleet:
            out = asyncio.run(_saturate(fleet, args))
        ok = [o for o in out if o.status == 200 and w0 <= o.started <= w1]
        rows.append({
            "routers": count, "clients": args.clients, "sent": len(out),
            "images_per_s_model": round(images_per_s(out, w0, w1) / s, 4),
            "per_router_images_per_s_model": [round(images_per_s([o for o in out if o.who == f"router-{i}"], w0, w1) / s, 4)
                                              for i in range(count)],
            "http_5xx": sum(1 for o in out if o.status >= 500), "http_429": sum(1 for o in out if o.status == 429),
            "no_answer": sum(1 for o in out if o.status == 0),
            "first_error": next((o.error for o in out if o.status != 200), None),
            "latency_model_s": {"p50": pct([o.latency for o in ok], 50, s), "p99": pct([o.latency for o in ok], 99, s)},
            "loadavg_1m": round(os.getloadavg()[0], 2),
        })
        print(json.dumps({k: rows[-1][k] for k in ("routers", "images_per_s_model", "http_5xx", "loadavg_1m")}),
              file=sys.stderr, flush=True)
    ratio = rows[1]["images_per_s_model"] / rows[0]["images_per_s_model"] if rows[0]["images_per_s_model"] else 0.0
    capacity = modelled_images_per_s(args)
    misses = (["ratio < 0.95"] if ratio < 0.95 else []) + (["5xx"] if any(r["http_5xx"] for r in rows) else [])
    lines = ["| routers | clients | images/s (model) | per router | vs modelled capacity | 5xx | 429 "
             "| latency p50 / p99 s (model) | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['routers']} | {r['clients']} | {r['images_per_s_model']:.4f} | "
                     f"{' + '.join(f'{v:.4f}' for v in r['per_router_images_per_s_model'])} | "
                     f"{r['images_per_s_model'] / capacity:.3f} | **{r['http_5xx']}** | {r['http_429']} | "
                     f"{_f(r['latency_model_s']['p50'], 1)} / {_f(r['latency_model_s']['p99'], 1)} | {r['loadavg_1m']} |")
    lines.append(f"\nthroughput two/one = **{ratio:.3f}** (target >= 0.95)")
    return {"run": "routers", "time_scale": s, "modelled_images_per_s": round(capacity, 4), "rows": rows,
            "ratio_two_over_one": round(ratio, 4), "targets_missed": misses, "table": "\n".join(lines)}


# ---------------------------------------------------------------------------
# 3. priority


def _admitted_by_tier(url: str) -> dict[str, float]:
    """glm_router_admitted_images_total by tier and tenant, from the router's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {}
    for m in re.finditer(r'^glm_router_admitted_images_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        found[f"{labels.get('tenant')}/{labels.get('tier')}"] = float(m.group(2))
    return found


async def _priority(fleet: Fleet, args: argparse.Namespace, keys: dict[str, str]) -> dict[str, list[Outcome]]:
    timeout = request_timeout_s(args, args.priority_deadline)
    interactive = KeepAliveClient(fleet.urls[0], timeout, connections=2, api_key=keys["interactive"])
    batch = KeepAliveClient(fleet.urls[0], timeout, connections=args.batch_clients, api_key=keys["batch"])
    try:
        t0 = time.perf_counter()
        warm = await send(interactive, "warmup", -1, t0)
        baseline = [await send(interactive, "baseline", -2 - i, t0) for i in range(args.baseline_requests)]
        t0 = time.perf_counter()
        flood, served = await asyncio.gather(
            closed_loop(batch, "batch", args.batch_clients, args.priority_duration, t0),
            closed_loop(interactive, "interactive", 1, args.priority_duration, t0, start_at=args.priority_warmup))
        return {"warmup": [warm], "baseline": baseline, "batch": flood, "interactive": served}
    finally:
        await interactive.aclose()
        await batch.aclose()


def priority(args: argparse.Namespace) -> dict[str, Any]:
    """A flex tenant floods, a priority tenant sends one at a time (see the module docstring)."""
    s = args.time_scale
    settings = scaled_router_settings(args, request_deadline_s=args.priority_deadline,
                                      priority_aging_s=args.priority_aging)
    keys = {"batch": secrets.token_hex(16), "interactive": secrets.token_hex(16)}
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "api_keys.txt"
        key_file.write_text(f"{keys['batch']} name=batch tier=flex\n{keys['interactive']} name=interactive tier=priority\n")
        with Fleet(Path(tmp), args, settings, router_args=["--api-key-file", str(key_file)]) as fleet:
            out = asyncio.run(_priority(fleet, args, keys))
            by_tier = _admitted_by_tier(fleet.urls[0])
    curve = BatchingCurve(args.tokens_per_s, args.batch_growth)
    floor_idle = TOKENS_1024 / curve.per_stream(1) + args.dit_s
    floor_full = TOKENS_1024 / curve.per_stream(args.max_batch) + args.dit_s
    base = [o.latency for o in out["baseline"] if o.status == 200]
    inter = [o.latency for o in out["interactive"] if o.status == 200]
    w0, w1 = args.priority_warmup, args.priority_duration
    failures = [o for part in ("baseline", "batch", "interactive") for o in out[part] if o.status != 200]
    result = {
        "run": "priority", "time_scale": s, "batch_clients": args.batch_clients,
        "baseline": {"n": len(base), "p50_model_s": pct(base, 50, s), "p99_model_s": pct(base, 99, s)},
        "interactive": {"n": len(inter), "p50_model_s": pct(inter, 50, s), "p99_model_s": pct(inter, 99, s),
                        "max_model_s": pct(inter, 100, s)},
        "model_floor_s": {"idle_batch_1": round(floor_idle, 1), f"ar_batch_{args.max_batch}": round(floor_full, 1)},
        "batch_images_per_s_model": round(images_per_s(out["batch"], w0, w1) / s, 4),
        "modelled_images_per_s": round(modelled_images_per_s(args), 4),
        "failures": len(failures), "first_failure": failures[0].error if failures else None,
        "http_429": sum(o.status == 429 for o in failures),
        "admitted_images_by_tenant_tier": by_tier, "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    r = result
    lines = ["| interactive (tier priority) | requests | p50 s (model) | p99 s (model) | timing model, no waiting, s |",
             "|---|---|---|---|---|",
             f"| idle fleet | {r['baseline']['n']} | {_f(r['baseline']['p50_model_s'], 1)} | "
             f"{_f(r['baseline']['p99_model_s'], 1)} | {floor_idle:.1f} (AR batch 1 + DiT) |",
             f"| under a flex flood of {args.batch_clients} clients | {r['interactive']['n']} | "
             f"{_f(r['interactive']['p50_model_s'], 1)} | {_f(r['interactive']['p99_model_s'], 1)} | "
             f"{floor_full:.1f} (AR batch {args.max_batch} + DiT) |",
             f"\nbatch (tier flex) throughput under the flood: {r['batch_images_per_s_model']:.4f} images/s (model), "
             f"fleet capacity {r['modelled_images_per_s']:.4f}; failures {r['failures']} (429: {r['http_429']}); "
             f"admitted images by tenant/tier: {by_tier}"]
    result["table"] = "\n".join(lines)
    return result


# ---------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.scheduling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", choices=["overload", "routers", "priority", "all"])
    p.add_argument("--out", help="write the results (and tables) to this JSON file")
    p.add_argument("--router-log-level", default="INFO", help="the routers' log level (default: %(default)s, the product's)")
    f = p.add_argument_group("fleet (timing model; durations in model seconds)")
    f.add_argument("--time-scale", type=float, default=10.0, help="sims run this many times faster (default: %(default)s)")
    f.add_argument("--ar-workers", type=int, default=1)
    f.add_argument("--dit-workers", type=int, default=2)
    f.add_argument("--max-batch", type=int, default=8, help="AR batch = AR worker capacity (default: %(default)s)")
    f.add_argument("--tokens-per-s", type=float, default=VLLM_OMNI_AR_TOKENS_PER_S)
    f.add_argument("--batch-growth", type=float, default=DEFAULT_BATCH_GROWTH)
    f.add_argument("--dit-s", type=float, default=VLLM_OMNI_DIT_S_50_STEPS, help="seconds per 1024x1024 50-step image")
    f.add_argument("--jitter", type=float, default=0.1, help="DiT job times +-this fraction (default: %(default)s)")
    f.add_argument("--priority-aging", type=float, default=60.0, help="router priority_aging_s, model s (default: %(default)s)")
    o = p.add_argument_group("overload")
    o.add_argument("--duration", type=float, default=120.0, help="wall seconds of arrivals (default: %(default)s)")
    o.add_argument("--load-factor", type=float, default=3.0, help="offered load / modelled capacity (default: %(default)s)")
    o.add_argument("--deadline", type=float, default=60.0, help="request_deadline_s, model s (default: %(default)s)")
    o.add_argument("--max-queue-wait", type=float, default=20.0, help="max_queue_wait_s, model s (default: %(default)s)")
    o.add_argument("--warmup-requests", type=int, default=1, help="sequential requests before the load (default: %(default)s)")
    r = p.add_argument_group("routers")
    r.add_argument("--clients", type=int, default=16, help="closed-loop clients, split over the routers (default: %(default)s)")
    r.add_argument("--routers-warmup", type=float, default=10.0, help="wall seconds before measuring (default: %(default)s)")
    r.add_argument("--routers-duration", type=float, default=60.0, help="measured wall seconds (default: %(default)s)")
    r.add_argument("--routers-deadline", type=float, default=1200.0, help="request_deadline_s, model s (default: %(default)s)")
    q = p.add_argument_group("priority")
    q.add_argument("--batch-clients", type=int, default=16, help="flex closed-loop clients (default: %(default)s)")
    q.add_argument("--baseline-requests", type=int, default=10, help="interactive requests on the idle fleet (default: %(default)s)")
    q.add_argument("--priority-warmup", type=float, default=10.0, help="wall seconds of flood before interactive requests")
    q.add_argument("--priority-duration", type=float, default=120.0, help="wall seconds of flood (default: %(default)s)")
    q.add_argument("--priority-deadline", type=float, default=1200.0, help="request_deadline_s, model s (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the chosen run(s), print their tables, optionally save JSON; exit 1 when a target was missed."""
    args = build_parser().parse_args(argv)
    runs = {"overload": overload, "routers": routers, "priority": priority}
    chosen = list(runs) if args.run == "all" else [args.run]
    results = []
    for name in chosen:
        print(f"== {name} (load average {os.getloadavg()[0]:.2f} before)", flush=True)
        result = runs[name](args)
        print(result["table"], flush=True)
        if result.get("targets_missed"):
            print(f"targets missed: {', '.join(result['targets_missed'])}", flush=True)
        results.append(result)
        if args.out:  # after each run, so a later failure keeps the earlier results
            Path(args.out).write_text(json.dumps({"command": sys.argv, "args": vars(args), "results": results}, indent=2))
    return 1 if any(r.get("targets_missed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
