"""A worker's metrics port also answers /health and /ready, and the worker announces where to scrape it.

What Kubernetes probes rely on (deploy/k8s): /health is 200 while the worker's event loop runs and
503 once it is wedged, /ready is 503 until the worker is registered with a router and 200 after,
and the metrics address a worker announces reaches the router (GET /metrics/targets).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from common.metrics import MetricsServer, WorkerMetrics, WorkerProbes
from common.worker_main import loopback_advertise_warning, metrics_advertise_address, parse_advertise
from harness.local_cluster import ROOT, TINY_STAGE_CONFIG, Cluster, free_port


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def _poll(check, timeout: float, what: str, on_fail=lambda: ""):
    """Call `check()` until it returns something truthy; return that, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout}s\n{on_fail()}")


def test_ready_follows_registration_and_the_router_learns_the_metrics_address(tiny_model, tmp_path):
    metrics_port = free_port()
    base = f"http://127.0.0.1:{metrics_port}"
    cluster = Cluster(model=tiny_model, workdir=tmp_path, num_ar=0, num_dit=0)
    try:
        # No router yet: the worker loads its model, then waits for one.
        worker = cluster.start_worker("dit", "dit-probed", extra=["--metrics-port", str(metrics_port)])
        seen: list[tuple[int, dict]] = []

        def healthy():
            assert worker.alive(), worker.log()
            r = _get(f"{base}/health")
            if r is not None:
                seen.append((r.status_code, r.json()))
                return r.status_code == 200
            return False

        _poll(healthy, 120, "the worker's /health never answered 200", worker.log)
        # Anything before 200 was "loading", never another failure.
        assert all(body["status"] == "loading" for code, body in seen if code != 200), seen
        ready = httpx.get(f"{base}/ready", timeout=5)
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "not_ready"
        assert "not registered" in ready.json()["reason"] and cluster.bus_address in ready.json()["reason"]
        # Metrics are served meanwhile, from the same port.
        assert "glm_worker_jobs_in_flight" in httpx.get(f"{base}/metrics", timeout=5).text

        cluster.start_router()
        cluster.wait_for_http()
        _poll(lambda: (r := _get(f"{base}/ready")) is not None and r.status_code == 200, 60,
              "the worker's /ready never turned 200 after the router started", cluster.logs_tail)
        assert httpx.get(f"{base}/ready", timeout=5).json() == {"status": "ready"}

        # The router lists the address the worker announced (a concrete --metrics-host: that host).
        def announced():
            r = _get(f"{cluster.url}/metrics/targets")
            if r is None or r.status_code != 200:
                return None
            return [g for g in r.json() if f"127.0.0.1:{metrics_port}" in g.get("targets", [])]

        _poll(announced, 30, f"127.0.0.1:{metrics_port} not in the router's /metrics/targets", cluster.logs_tail)

        # SIGTERM: the worker drains, exits 0 and its metrics port is closed with it.
        cluster.kill("dit-probed", sig=15)
        assert cluster.wait_exit("dit-probed", timeout=60) == 0, worker.log()
        assert _get(f"{base}/health") is None
    finally:
        cluster.stop()


def test_health_turns_503_while_the_event_loop_is_wedged_and_metrics_still_answer():
    probes = WorkerProbes(stall_after_s=0.5)
    server = WorkerMetrics("ar", "ar-wedge").serve(0, "127.0.0.1", probes)
    base = f"http://127.0.0.1:{server.port}"
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    unwedge = threading.Event()
    try:
        before = httpx.get(f"{base}/health", timeout=5)
        assert (before.status_code, before.json()["status"]) == (503, "loading")
        async def start_beats() -> asyncio.Task:
            return asyncio.create_task(probes.run_beats(interval_s=0.05))

        async def stop_beats(task: asyncio.Task) -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        beats = asyncio.run_coroutine_threadsafe(start_beats(), loop).result(timeout=10)
        probes.loaded(lambda: None)
        _poll(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, 10, "/health never turned 200")
        assert httpx.get(f"{base}/ready", timeout=5).status_code == 200

        loop.call_soon_threadsafe(unwedge.wait, 30)  # the loop blocks here, as a wedged worker would
        stalled = _poll(lambda: (r := httpx.get(f"{base}/health", timeout=5)).status_code == 503 and r, 10,
                        "/health stayed 200 with the loop wedged")
        assert stalled.json()["status"] == "stalled" and "event loop has not run" in stalled.json()["reason"]
        assert httpx.get(f"{base}/metrics", timeout=5).status_code == 200  # served from its own thread

        unwedge.set()
        _poll(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, 10, "/health did not recover")
        asyncio.run_coroutine_threadsafe(stop_beats(beats), loop).result(timeout=10)
    finally:
        unwedge.set()
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(timeout=10)
        loop.close()
        server.close()
    with pytest.raises(httpx.ConnectError):  # close() freed the port
        httpx.get(f"{base}/health", timeout=2)


def test_ready_reports_the_check_reason():
    probes = WorkerProbes()
    server = MetricsServer(WorkerMetrics("dit", "dit-x").registry, probes, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.port}"
        loading = httpx.get(f"{base}/ready", timeout=5)
        assert (loading.status_code, loading.json()) == (503, {"status": "not_ready", "reason": "the model is loading"})
        probes.loaded(lambda: "draining")
        draining = httpx.get(f"{base}/ready", timeout=5)
        assert (draining.status_code, draining.json()["reason"]) == (503, "draining")
        assert draining.headers["content-type"] == "application/json"
    finally:
        server.close()


def test_advertised_address_defaults_and_parsing():
    # A concrete bind host is announced as it is; a wildcard bind announces the address the OS
    # uses towards the router (loopback here).
    assert metrics_advertise_address("127.0.0.1", 9100, ["tcp://127.0.0.1:5570"]) == "127.0.0.1:9100"
    assert metrics_advertise_address("0.0.0.0", 9100, ["tcp://127.0.0.1:5570"]) == "127.0.0.1:9100"
    assert metrics_advertise_address("::", 9101, ["tcp://[::1]:5570"]) == "[::1]:9101"
    assert parse_advertise("10.1.2.3", 9100) == "10.1.2.3:9100"
    assert parse_advertise("10.1.2.3:9200", 9100) == "10.1.2.3:9200"
    assert parse_advertise("[fd00::1]", 9100) == "[fd00::1]:9100"
    assert parse_advertise("pod-0.glm.svc:9100", 1) == "pod-0.glm.svc:9100"
    for bad in ("fd00::1", "host:0", "host:http", "", "a b", "[fd00::1"):
        with pytest.raises(ValueError, match="--metrics-advertise"):
            parse_advertise(bad, 9100)


def test_a_comma_list_of_routers_works_like_repeated_router_flags(monkeypatch):
    """`--router A,B` (as docs/deploy.md writes it) finds the address towards A, as `--router A --router B`
    does; it used to fail to parse and fall back to this machine's name, unresolvable here."""
    monkeypatch.setattr(socket, "gethostname", lambda: "worker-host.invalid")
    for routers in (["tcp://[::1]:5570,tcp://[::1]:5571"], ["tcp://[::1]:5570", "tcp://[::1]:5571"],
                    ["tcp://[::1]:5570, tcp://[::1]:5571", "tcp://[::1]:5572"]):
        assert metrics_advertise_address("::", 9101, routers) == "[::1]:9101", routers
    for routers in (["tcp://127.0.0.1:5570,tcp://127.0.0.2:5570"], ["tcp://127.0.0.1:5570", "tcp://127.0.0.2:5570"]):
        assert metrics_advertise_address("0.0.0.0", 9100, routers) == "127.0.0.1:9100", routers


@pytest.mark.parametrize("address, routers, remote", [
    ("127.0.0.1:9100", ["tcp://10.0.0.5:5570"], ["10.0.0.5:5570"]),
    ("127.0.0.1:9100", ["tcp://127.0.0.1:5570,tcp://10.0.0.6:5570"], ["10.0.0.6:5570"]),  # one remote is enough
    ("[::1]:9100", ["tcp://127.0.0.1:5570", "tcp://[fd00::5]:5570"], ["[fd00::5]:5570"]),
    ("localhost:9100", ["tcp://router.invalid:5570"], ["router.invalid:5570"]),  # unresolvable: assumed remote
    ("127.0.0.1:9100", ["tcp://127.0.0.1:5570,tcp://[::1]:5570", "tcp://localhost:5570"], None),  # all local
    ("127.0.0.1:9100", ["ipc:///tmp/glm-bus"], None),
    ("10.0.0.7:9100", ["tcp://10.0.0.5:5570"], None),  # not loopback: reachable
])
def test_a_loopback_metrics_address_announced_to_a_remote_router_is_a_warning(address, routers, remote):
    warning = loopback_advertise_warning(address, routers)
    if remote is None:
        assert warning is None
        return
    assert warning is not None and address in warning and "--metrics-advertise" in warning, warning
    assert all(router in warning for router in remote), warning


def test_the_default_metrics_host_with_a_remote_router_logs_the_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="common.worker_main"):
        assert metrics_advertise_address("127.0.0.1", 9100, ["tcp://10.0.0.5:5570,tcp://10.0.0.6:5570"]) == "127.0.0.1:9100"
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "--metrics-advertise" in caplog.text and "10.0.0.6:5570" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.worker_main"):
        metrics_advertise_address("127.0.0.1", 9100, ["tcp://127.0.0.1:5570"])
    assert caplog.records == []


@pytest.mark.parametrize("extra, message", [
    (["--metrics-advertise", "10.0.0.7:99999", "--metrics-port", "9100"], "the port must be a number in 1..65535"),
    (["--metrics-advertise", "10.0.0.7:9100"], "needs --metrics-port"),
])
def test_bad_metrics_advertise_is_refused_at_start(tiny_model, extra, message):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "ar-worker", "--router", "tcp://127.0.0.1:1", "--stage-config",
         str(TINY_STAGE_CONFIG), "--model", str(tiny_model), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_metrics_advertise_from_the_environment(tiny_model):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "ar-worker", "--router", "tcp://127.0.0.1:1", "--stage-config",
         str(TINY_STAGE_CONFIG), "--model", str(tiny_model), "--metrics-port", "9100"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "GLM_METRICS_ADVERTISE": "[::1"})
    assert proc.returncode == 1 and "write an IPv6 address as [ADDR]" in proc.stderr, proc.stderr
