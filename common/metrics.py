"""What a worker process exports over HTTP: Prometheus metrics and its /health and /ready probes.

The router defines its own metrics in router/core/metrics.py. A worker's HTTP server runs in threads
of its own (prometheus_client's WSGI app in a threading server), so a scrape or a probe is never
blocked by the worker's event loop; /health is how a wedged loop becomes visible from outside.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from typing import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from common import defaults
from common.protocol import ErrorCode

logger = logging.getLogger(__name__)

# Seconds, from tiny-model CPU jobs to full-size GPU ones.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
# The event loop beats this often, and /health turns 503 when the last beat is older than
# LOOP_STALL_S: jobs run in threads, so the loop itself never legitimately blocks that long.
LOOP_BEAT_INTERVAL_S = 1.0
LOOP_STALL_S = 30.0


class WorkerMetrics:
    """Per-worker job metrics on their own registry (no global state)."""

    def __init__(self, stage: str, worker_id: str):
        self.registry = CollectorRegistry()
        labels = {"stage": stage, "worker_id": worker_id}
        self.jobs = Counter("glm_worker_jobs", "Jobs finished, by outcome", ["stage", "worker_id", "outcome"], registry=self.registry)
        self.job_seconds = Histogram(
            "glm_worker_job_duration_seconds", "Job run time", ["stage", "worker_id"], buckets=LATENCY_BUCKETS,
            registry=self.registry).labels(**labels)
        self.in_flight = Gauge("glm_worker_jobs_in_flight", "Jobs running", ["stage", "worker_id"], registry=self.registry).labels(**labels)
        self.tokens = Counter("glm_worker_generated_tokens", "AR tokens generated", ["stage", "worker_id"], registry=self.registry).labels(**labels)
        self.denoising_steps = Counter(
            "glm_worker_denoising_steps", "DiT denoising steps completed (one scheduler step: every transformer pass "
            "it takes, both guidance branches)", ["stage", "worker_id"], registry=self.registry).labels(**labels)
        self._labels = labels
        self.worker_id = worker_id
        for outcome in ("ok", *(code.value for code in ErrorCode)):  # every outcome is a series from the start
            self.jobs.labels(outcome=outcome, **labels)

    def job_finished(self, outcome: str) -> None:
        self.jobs.labels(outcome=outcome, **self._labels).inc()

    def serve(self, port: int, host: str = defaults.LOCAL_HOST, probes: "WorkerProbes | None" = None) -> "MetricsServer":
        """Serve /metrics (and /health, /ready from `probes`) on host:port; the caller closes it."""
        return MetricsServer(self.registry, probes or WorkerProbes(), host, port)


class WorkerProbes:
    """The state /health and /ready report, written by the worker's event loop, read by HTTP threads.

    - /health: 503 `loading` until the model is loaded and the loop beats (model loading runs
      on the loop: a startup probe's budget bounds it), then 200 while the last beat is fresher
      than `stall_after_s`, 503 `stalled` once the loop has been wedged that long.
    - /ready: 200 once loaded and `ready_check()` returns None; 503 with its reason otherwise.
    """

    def __init__(self, stall_after_s: float = LOOP_STALL_S):
        self.stall_after_s = stall_after_s
        self._last_beat: float | None = None
        self._ready_check: Callable[[], str | None] | None = None

    def loaded(self, ready_check: Callable[[], str | None]) -> None:
        """The model is loaded; from now on `ready_check()` says why the worker is not ready (None: ready).
        It is called from HTTP threads, so it must only read state."""
        self._ready_check = ready_check

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    async def run_beats(self, interval_s: float = LOOP_BEAT_INTERVAL_S) -> None:
        """Beat every `interval_s` until cancelled; run it as a task on the loop being watched."""
        while True:
            self.beat()
            await asyncio.sleep(interval_s)

    def health(self) -> tuple[bool, dict[str, object]]:
        last = self._last_beat
        if last is None or self._ready_check is None:
            return False, {"status": "loading", "reason": "the model is loading"}
        age = time.monotonic() - last
        if age > self.stall_after_s:
            return False, {"status": "stalled", "reason": f"event loop has not run for {age:.1f}s"}
        return True, {"status": "alive"}

    def readiness(self) -> tuple[bool, dict[str, object]]:
        check = self._ready_check
        if check is None:
            return False, {"status": "not_ready", "reason": "the model is loading"}
        reason = check()
        if reason is not None:
            return False, {"status": "not_ready", "reason": reason}
        return True, {"status": "ready"}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: no access log
        pass


class MetricsServer:
    """GET /metrics (Prometheus), /health and /ready on host:port, from a thread per request.

    Port 0 picks a free port (`port` tells which). `close()` stops serving and frees the port.
    """

    def __init__(self, registry: CollectorRegistry, probes: WorkerProbes, host: str, port: int):
        self.probes = probes
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path in ("/health", "/ready"):
                ok, body = probes.health() if path == "/health" else probes.readiness()
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
                return [json.dumps(body).encode()]
            return metrics_app(environ, start_response)

        # A server class per instance: the address family follows `host` (IPv4 or IPv6).
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("_MetricsHTTPServer", (ThreadingWSGIServer,), {"address_family": family})
        self._httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.host, self.port = host, self._httpd.server_address[1]
        # Polled every 0.1 s rather than 0.5 s: `close()` waits for the poll, and a worker's exit for `close()`.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"metrics:{self.port}", daemon=True)
        self._thread.start()
        logger.info("metrics, /health and /ready on http://%s:%d", host, self.port)

    def close(self) -> None:
        """Stop serving and release the port; returns once the serving thread has ended."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
