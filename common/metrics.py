"""Prometheus metrics a worker process exports; the router defines its own in router/metrics.py."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Seconds, from tiny-model CPU jobs to full-size GPU ones.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)


class WorkerMetrics:
    """Per-worker job metrics on their own registry (no global state)."""

    def __init__(self, stage: str, worker_id: str):
        self.registry = CollectorRegistry()
        labels = {"stage": stage, "worker_id": worker_id}
        self.jobs = Counter("glm_worker_jobs", "Jobs finished, by outcome", ["stage", "worker_id", "outcome"], registry=self.registry)
        self.job_seconds = Histogram(
            "glm_worker_job_seconds", "Job run time", ["stage", "worker_id"], buckets=LATENCY_BUCKETS, registry=self.registry
        ).labels(**labels)
        self.in_flight = Gauge("glm_worker_jobs_in_flight", "Jobs running", ["stage", "worker_id"], registry=self.registry).labels(**labels)
        self.tokens = Counter("glm_worker_generated_tokens", "AR tokens generated", ["stage", "worker_id"], registry=self.registry).labels(**labels)
        self._labels = labels

    def job_finished(self, outcome: str) -> None:
        self.jobs.labels(outcome=outcome, **self._labels).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP for Prometheus to scrape."""
        start_http_server(port, addr=host, registry=self.registry)
