"""Cancellation, overload, graceful drain and router restarts, on real processes.

One 1 AR + 1 DiT cluster with `queue_limit_per_stage: 0` (the only way in is a
free AR slot, so overload is easy to reach), shared by the module. Before each
test, `serving` brings back a router that a test before stopped and waits for
one live worker per stage, so every test also passes alone.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness.local_cluster import Cluster, free_port, generate
from tests.helpers import cluster_with, metric


@pytest.fixture(scope="module")
def rc(tiny_model, tmp_path_factory):
    with cluster_with(tiny_model, tmp_path_factory, "reliability", {"router": {"queue_limit_per_stage": 0}}) as c:
        yield c


@pytest.fixture(autouse=True)
def serving(rc):
    """A running router and one worker per stage (each restarted if a test before stopped it)."""
    if not rc.procs["router"].alive():
        rc.start_router()
    for stage in ("ar", "dit"):
        if not rc.procs[f"{stage}-0"].alive():
            rc.start_worker(stage, f"{stage}-0")
    rc.wait_for_workers(1, 1, timeout=180, exact=True)


def open_request(cluster: Cluster, body: dict) -> socket.socket:
    """Send a generation request on a raw socket and return it unread (closing it = the client leaving)."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", cluster.http_port), timeout=10)
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("stage,steps", [("ar", 1), ("dit", 200)])
def test_client_disconnect_cancels_on_the_worker(rc, stage, steps):
    worker = f"{stage}-0"
    offset = len(rc.procs[worker].log())
    cancelled_before = metric(rc, 'glm_router_images_total{outcome="cancelled"}')
    sock = open_request(rc, {"prompt": "a tree", "size": "256x256", "num_inference_steps": steps, "seed": 31})
    job = rc.wait_for_log(worker, rf"job (\S+\.{stage}\.\d+) started", timeout=120, start=offset).group(1)
    sock.close()  # the client goes away mid-job
    # The router tells the worker, which stops the job (AR at the next token, DiT at the next step).
    found = rc.wait_for_log(worker, rf"job {re.escape(job)} cancelled after ([\d.]+)s", timeout=30, start=offset)
    log = rc.procs[worker].log()[offset:]
    assert "cancel requested" in log
    assert not re.search(rf"job {re.escape(job)} done", log)
    if stage == "dit":
        assert float(found.group(1)) < 60, "200 steps ran to the end instead of stopping"
    rc.wait_for_log("router", r"client disconnected; request cancelled", timeout=10)
    assert metric(rc, 'glm_router_images_total{outcome="cancelled"}') == cancelled_before + 1
    # The slot is free again: a follow-up request is admitted (queue limit 0) and served.
    t0 = time.monotonic()
    response = generate(rc.url, seed=32, timeout=120)
    assert response.status_code == 200, response.text[:300]
    assert metric(rc, "glm_router_pending_images") == 0
    print(f"\ncancel during {stage}: worker stopped the job after {found.group(1)}s; follow-up served in {time.monotonic() - t0:.1f}s")


def test_overload_is_a_429_with_retry_after(rc):
    offset = len(rc.procs["ar-0"].log())
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(generate, rc.url, seed=41, timeout=180)
        rc.wait_for_log("ar-0", r"job \S+\.ar\.\d+ started", timeout=60, start=offset)
        refused = [generate(rc.url, seed=42 + i, timeout=30) for i in range(3)]
        assert first.result(timeout=180).status_code == 200
    for response in refused:
        assert response.status_code == 429, response.text[:300]
        assert int(response.headers["Retry-After"]) >= 1
        assert "capacity" in response.json()["error"]["message"]
    assert metric(rc, "glm_router_admission_rejected_total") >= 3
    assert generate(rc.url, seed=45, timeout=180).status_code == 200  # admitted again once idle


def test_sigterm_drains_a_worker(rc):
    offset = len(rc.procs["dit-0"].log())
    router_offset = len(rc.procs["router"].log())
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(generate, rc.url, seed=51, steps=12, timeout=300)
        job = rc.wait_for_log("dit-0", r"job (\S+\.dit\.\d+) started", timeout=120, start=offset).group(1)
        rc.kill("dit-0", signal.SIGTERM)
        response = future.result(timeout=300)
    assert response.status_code == 200, response.text[:300]
    assert rc.wait_exit("dit-0", timeout=60) == 0
    log = rc.procs["dit-0"].log()[offset:]
    assert "SIGTERM received: draining" in log and re.search(rf"job {re.escape(job)} done", log), log[-2000:]
    router_log = rc.procs["router"].log()[router_offset:]
    assert "worker dit-0 deregistered" in router_log
    assert "re-dispatching" not in router_log  # the in-flight job finished where it was
    rc.wait_for_workers(1, 0, timeout=10, exact=True)
    rc.start_worker("dit", "dit-0")
    rc.wait_for_workers(1, 1, timeout=180, exact=True)


@pytest.mark.parametrize("stage", ["ar", "dit"])
def test_an_idle_worker_exits_promptly_on_sigterm(rc, stage):
    """No jobs, so nothing to wait for: exit within 2 s, also with a second router that never answers
    (nothing queued for it can leave, so no linger on its socket). It took 2.5-4.5 s: that linger,
    and the interpreter tearing down torch and friends after the worker had finished."""
    name = f"{stage}-idle"
    silent_router = f"tcp://127.0.0.1:{free_port()}"
    rc.start_worker(stage, name, extra=["--router", silent_router])
    try:
        rc.wait_for_workers(2 if stage == "ar" else 1, 2 if stage == "dit" else 1, timeout=180, exact=True)
        rc.wait_for_log(name, r"connecting to router " + re.escape(silent_router), timeout=10)
        started = time.monotonic()
        rc.kill(name, signal.SIGTERM)
        status = rc.wait_exit(name, timeout=60)
        took = time.monotonic() - started
        log = rc.procs[name].log()
        assert status == 0, log[-2000:]
        assert took < 2.0, f"exited {took:.2f}s after SIGTERM\n{log[-2000:]}"
        assert "draining: 0 job(s) in flight" in log
    finally:
        rc.kill(name)
    rc.wait_for_workers(1, 1, timeout=30, exact=True)  # it said goodbye to the router


def test_router_sigterm_finishes_in_flight_requests(rc):
    offset = len(rc.procs["dit-0"].log())
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(generate, rc.url, seed=61, steps=40, timeout=180)
        # SIGTERM while the DiT still has most of its 40 steps to go.
        rc.wait_for_log("dit-0", r"job \S+\.dit\.\d+ started", timeout=120, start=offset)
        rc.kill("router", signal.SIGTERM)
        response = future.result(timeout=180)
    assert response.status_code == 200, response.text[:300]
    # A graceful stop is a clean exit (the router handles the signal itself, not uvicorn).
    assert rc.wait_exit("router", timeout=60) == 0
    assert "unhandled error" not in rc.procs["router"].log()


def test_restarted_router_is_found_by_its_workers(rc):
    """Workers re-register with a new router on the same ports with no manual step, after a SIGTERM
    and after a SIGKILL. The router stays down until both workers have given up on it and
    reconnected (the path that once left a worker deaf)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        offsets = {name: len(rc.procs[name].log()) for name in ("ar-0", "dit-0")}
        rc.kill("router", sig)
        rc.wait_exit("router", timeout=60)
        for name, offset in offsets.items():
            rc.wait_for_log(name, r"router \S+ silent for [\d.]+s: reconnecting", timeout=30, start=offset)
        rc.start_router()
        rc.wait_for_workers(1, 1, timeout=60, exact=True)
        for seed in (71, 72):
            response = generate(rc.url, seed=seed, timeout=180)
            assert response.status_code == 200, response.text[:300]
