"""The router's Prometheus metrics, on a registry the app exposes at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.metrics import LATENCY_BUCKETS


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.stage_seconds = Histogram(
            "glm_router_stage_seconds", "Stage job latency seen by the router (queueing included)", ["stage"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self.stage_retries = Counter("glm_router_stage_retries", "Stage jobs re-dispatched, by reason", ["stage", "reason"], registry=registry)
        self.images = Counter("glm_router_images", "Images finished, by outcome", ["outcome"], registry=registry)
        self.rejected = Counter("glm_router_admission_rejected", "Requests refused by admission control", registry=registry)
        self.live_workers = Gauge("glm_router_live_workers", "Live workers per stage", ["stage"], registry=registry)
        self.workers_refused = Counter(
            "glm_router_workers_refused", "Worker registrations refused, by reason (once per worker and config)",
            ["reason"], registry=registry)
        self.result_cache = Counter(
            "glm_router_result_cache", "Exact-repeat cache look-ups (requests with an explicit seed), by outcome",
            ["outcome"], registry=registry)
        self.result_cache_bytes = Gauge("glm_router_result_cache_bytes", "Image bytes held by the exact-repeat cache",
                                        registry=registry)
        self.pending_images = Gauge("glm_router_pending_images", "Images admitted and not finished", registry=registry)
