"""Smoke test of the benchmark tooling: the sim workers and bench/load.py run end to end.

A real router process, one simulated AR and two simulated DiT workers (timing models with tiny
latencies, bench/sim_workers.py), and bench/load.py's command line for a couple of seconds, closed
loop and open loop. Not a benchmark: it only checks that images flow and nothing fails.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench.capacity import ROOT, SimCluster


def test_sim_workers_and_load_generator_end_to_end(tmp_path):
    with SimCluster(tmp_path, {"queue_limit_per_stage": 64}) as sim:
        sim.start_sims("ar", 1, "--tokens-per-s", "20000", "--max-batch", "8")
        sim.start_sims("dit", 2, "--step-s", "0.001")  # 50 ms per 1024x1024 image at 50 steps
        out = tmp_path / "load.json"
        done = subprocess.run(
            [sys.executable, "-m", "bench.load", "--url", sim.url, "--concurrency", "4", "--duration", "2",
             "--size", "512x512", "--steps", "8", "--timeout", "30", "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        (closed,) = json.loads(out.read_text())
        assert closed["images_per_s"] > 0 and closed["ok"] > 0
        assert closed["errors"] == 0 and closed["http_429"] == 0, closed
        # The response's timings reached the report: compute on the workers, the rest is queue or edge.
        assert closed["ar_s"]["p50"] > 0 and closed["dit_s"]["p50"] > 0

        # Open loop through the chat API (vLLM-Omni's benchmark format), with a fixed seed.
        done = subprocess.run(
            [sys.executable, "-m", "bench.load", "--url", sim.url, "--rate", "10", "--duration", "1.5",
             "--api", "chat", "--size", "256x512", "--seed", "7", "--timeout", "30", "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        (opened,) = json.loads(out.read_text())
        assert opened["mode"] == "open" and opened["ok"] > 0 and opened["errors"] == 0, opened


def test_scheduling_bench_end_to_end(tmp_path):
    """bench/scheduling.py's three runs for a few seconds each (time scale 100): overload gets 429s
    with Retry-After, 1 and 2 routers serve without 5xx, the key file's tenants and tiers apply.
    Targets are not checked here (the windows are far too short); exit 1 only says one was missed."""
    out = tmp_path / "scheduling.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.scheduling", "all", "--time-scale", "100", "--duration", "3",
         "--routers-warmup", "1", "--routers-duration", "3", "--clients", "8", "--priority-warmup", "1",
         "--priority-duration", "4", "--batch-clients", "8", "--baseline-requests", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    overload, routers, priority = json.loads(out.read_text())["results"]
    assert overload["ok"] > 0 and overload["rejected_429"] > 0 and overload["other_failures"] == 0, overload
    assert overload["rejected_with_retry_after"] == overload["rejected_429"]
    assert [r["routers"] for r in routers["rows"]] == [1, 2], routers
    assert all(r["images_per_s_model"] > 0 and r["http_5xx"] == 0 for r in routers["rows"]), routers
    assert priority["failures"] == 0 and priority["interactive"]["n"] > 0, priority
    assert {"batch/flex", "interactive/priority"} <= set(priority["admitted_images_by_tenant_tier"]), priority
