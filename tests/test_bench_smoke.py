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
