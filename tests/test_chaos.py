"""Chaos: workers killed with SIGKILL mid-flight, on real processes.

With two workers per stage, a stream of concurrent requests survives losing
one worker of each stage: every request completes, none hangs, and each image
equals the fault-free one for its seed (retries are deterministic). With one
worker per stage, losing it gives a quick 503 naming the stage, and requests
succeed again once a worker is back.
"""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from common.stage_config import load_stage_config
from harness.local_cluster import Cluster, generate, image_bytes, write_stage_config
from tests.helpers import cluster_with

SEEDS = [101, 102, 103, 104, 105, 106]
STEPS = 2


def first_job_start(cluster: Cluster, names: list[str], stage: str, offsets: dict[str, int], timeout: float = 120) -> str:
    """Poll the workers' logs until one of them starts a `stage` job; return its name."""
    pattern = re.compile(rf"job \S+\.{stage}\.\d+ started")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in names:
            if pattern.search(cluster.procs[name].log()[offsets[name]:]):
                return name
        time.sleep(0.05)
    raise TimeoutError(f"no {stage} job started on {names}\n{cluster.logs_tail()}")


def run_all(url: str, seeds: list[int], timeout: float) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(lambda s: generate(url, seed=s, steps=STEPS, timeout=timeout), seeds))


@pytest.fixture(scope="module")
def two_by_two(tiny_model, tmp_path_factory):
    overrides = {"router": {"request_deadline_s": 400, "max_retries": 2}}
    with cluster_with(tiny_model, tmp_path_factory, "chaos", overrides, num_ar=2, num_dit=2) as c:
        yield c


def test_killing_one_worker_per_stage_loses_no_request(two_by_two):
    c = two_by_two
    reference = run_all(c.url, SEEDS, timeout=300)
    assert [r.status_code for r in reference] == [200] * len(SEEDS), [r.text[:200] for r in reference]
    expected = {seed: image_bytes(r)[0] for seed, r in zip(SEEDS, reference)}

    offsets = {name: len(p.log()) for name, p in c.procs.items()}
    started = time.monotonic()
    with ThreadPoolExecutor(len(SEEDS)) as pool:
        futures = {seed: pool.submit(generate, c.url, seed=seed, steps=STEPS, timeout=300) for seed in SEEDS}
        # Kill, mid-job, the first worker of each stage seen running one.
        ar_victim = first_job_start(c, ["ar-0", "ar-1"], "ar", offsets)
        c.kill(ar_victim, signal.SIGKILL)
        dit_victim = first_job_start(c, ["dit-0", "dit-1"], "dit", offsets)
        c.kill(dit_victim, signal.SIGKILL)
        responses = {seed: f.result(timeout=360) for seed, f in futures.items()}
    elapsed = time.monotonic() - started

    for seed, response in responses.items():
        assert response.status_code == 200, f"seed {seed}: {response.text[:300]}\n{c.logs_tail()}"
        assert image_bytes(response)[0] == expected[seed], f"seed {seed}: the retried image differs from the fault-free one"
    router_log = c.procs["router"].log()[offsets["router"]:]
    # The kills really hit jobs in flight: both were detected (a send finding the connection gone,
    # or heartbeats going silent, whichever came first) and their jobs re-dispatched.
    for victim, stage in ((ar_victim, "ar"), (dit_victim, "dit")):
        detected = rf"worker {victim} \({stage}\) (unreachable: dropped|silent for [\d.]+s: marked dead)"
        assert re.search(detected, router_log), router_log[-3000:]
        assert re.search(rf"worker {victim} (died|was unreachable) while running the job; re-dispatching",
                         router_log), router_log[-3000:]
    c.wait_for_workers(1, 1, timeout=30, exact=True)
    print(f"\nchaos: {len(SEEDS)} concurrent requests, killed {ar_victim} and {dit_victim} mid-job: "
          f"{len(SEEDS)}/{len(SEEDS)} completed in {elapsed:.1f}s, images identical to the fault-free run")


def test_single_worker_loss_is_a_fast_503_then_recovers(tiny_model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("chaos1")
    grace, deadline = 2.0, 120.0
    config = write_stage_config(workdir, {"router": {"no_worker_grace_s": grace, "request_deadline_s": deadline}})
    c = Cluster(model=tiny_model, workdir=workdir, stage_config=config)
    c.start()
    try:
        peer_timeout = load_stage_config(config).bus.peer_timeout_s
        bound = peer_timeout + grace + 10  # detection + grace + a slow shared CPU
        for stage in ("ar", "dit"):
            victim = f"{stage}-0"
            offset = len(c.procs[victim].log())
            with ThreadPoolExecutor(1) as pool:
                # Long enough a job that the kill lands while it runs (the tiny model is fast):
                # 1281 AR tokens at 1024x1024, or 40 denoising steps.
                slow = {"size": "1024x1024"} if stage == "ar" else {"steps": 40}
                future = pool.submit(generate, c.url, seed=7, **{"steps": STEPS, **slow}, timeout=deadline + 30)
                c.wait_for_log(victim, rf"job \S+\.{stage}\.\d+ started", timeout=120, start=offset)
                c.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
                response = future.result(timeout=deadline + 30)
            took = time.monotonic() - killed_at
            assert response.status_code == 503, response.text[:300]
            assert f"no live {stage} worker" in response.json()["error"]["message"]
            assert int(response.headers["Retry-After"]) >= 1
            assert took < bound, f"503 came {took:.1f}s after the kill"
            # While the stage is down, new requests fail just as fast.
            t0 = time.monotonic()
            again = generate(c.url, seed=8, steps=STEPS, timeout=60)
            assert again.status_code == 503 and f"no live {stage} worker" in again.text
            assert time.monotonic() - t0 < bound
            # A restarted worker registers again and takes work.
            c.start_worker(stage, victim)
            c.wait_for_workers(1, 1, timeout=180, exact=True)
            ok = generate(c.url, seed=9, steps=STEPS, timeout=300)
            assert ok.status_code == 200, ok.text[:300]
            assert re.search(rf"job \S+\.{stage}\.\d+ done", c.procs[victim].log()), "the restarted worker took no work"
    finally:
        c.stop()
