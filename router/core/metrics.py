"""The router's Prometheus metrics, on a registry the app exposes at /metrics.

Two kinds: instruments the code updates as things happen (counters, histograms), and the
per-stage state an autoscaler reads (live workers, slots, queue), which is read from the worker
table and the orchestrator's queue at scrape time, so it is exact at every scrape and cannot drift.
Every family is listed in docs/metrics.md; tests/test_metrics_catalogue.py keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.bus_security import HANDSHAKE_REFUSAL_REASONS
from common.metrics import LATENCY_BUCKETS
from common.protocol import Stage
from router.core.image_request import SERVICE_TIERS
from router.core.worker_pool import LOSS_REASONS

# Label values known up front are exported at 0 from the start, so that a rate or a ratio over
# them is a series (0) rather than nothing until the first event (Prometheus best practice).
IMAGE_OUTCOMES = ("ok", "failed", "cancelled", "cached")
RETRY_REASONS = ("worker_lost", "overloaded", "internal", "cancelled")
# A worker whose stage config differs (router/core/bus.py), then every refused bus handshake (CURVE).
WORKER_REFUSAL_REASONS = ("config_mismatch", *HANDSHAKE_REFUSAL_REASONS)
REJECT_REASONS = ("queue_full", "wait", "tenant_cap")


@dataclass(frozen=True)
class StageSnapshot:
    """One stage as the router sees it at one instant: what the scrape-time families report."""

    live_workers: int  # registered, heartbeating and not draining
    slots: int  # job slots of those workers (their summed capacity)
    busy_slots: int  # jobs of this router running on the stage's workers, draining ones included
    queued_jobs: int  # jobs waiting for a free slot
    registrations: int  # cumulative: workers that joined
    losses: Mapping[str, int]  # cumulative, by reason (worker_pool.LOSS_REASONS): workers dropped


class _StageCollector(Collector):
    """Exports StageSnapshots per stage at scrape time; every stage is always present."""

    def __init__(self, snapshot: Callable[[], Mapping[Stage, StageSnapshot]]):
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        # Names only (the registry refuses a second collector of the same names).
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        return self._families(self._snapshot())

    @staticmethod
    def _families(snapshots: Mapping[Stage, StageSnapshot]) -> Iterator[Metric]:
        gauges = {
            "live_workers": GaugeMetricFamily(
                "glm_router_live_workers", "Workers per stage that are registered, heartbeating and not draining",
                labels=["stage"]),
            "slots": GaugeMetricFamily(
                "glm_router_slots", "Job slots (summed capacity) of the stage's live workers", labels=["stage"]),
            "busy_slots": GaugeMetricFamily(
                "glm_router_busy_slots", "Slots holding a job of this router (draining workers included)",
                labels=["stage"]),
            "queued_jobs": GaugeMetricFamily(
                "glm_router_queued_jobs", "Stage jobs waiting in this router for a free worker slot",
                labels=["stage"]),
        }
        registrations = CounterMetricFamily(
            "glm_router_worker_registrations", "Workers that registered (joined this router's table)", labels=["stage"])
        losses = CounterMetricFamily(
            "glm_router_worker_losses", "Workers dropped from the table, by reason (timeout: silent past the peer "
            "timeout; left: said goodbye; restarted: came back as a new process; unreachable: connection gone)",
            labels=["stage", "reason"])
        for stage, snap in snapshots.items():
            for field, family in gauges.items():
                family.add_metric([stage.value], getattr(snap, field))
            registrations.add_metric([stage.value], snap.registrations)
            for reason in LOSS_REASONS:
                losses.add_metric([stage.value, reason], snap.losses.get(reason, 0))
        yield from gauges.values()
        yield registrations
        yield losses


class RouterMetrics:
    """The router's own families (the HTTP edge's are in router/edge/http_metrics.py)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.job_seconds = Histogram(
            "glm_router_job_duration_seconds", "Stage job latency seen by the router, from the first attempt's "
            "queueing to the result (retries included)", ["stage"], buckets=LATENCY_BUCKETS, registry=registry)
        self.job_retries = Counter(
            "glm_router_job_retries", "Stage jobs re-dispatched, by reason", ["stage", "reason"], registry=registry)
        self.images = Counter("glm_router_images", "Images finished, by outcome", ["outcome"], registry=registry)
        self.rejected = Counter(
            "glm_router_admission_rejected", "Requests refused by admission control (429), by reason (queue_full: a "
            "stage's waiting line is at its bound; wait: the estimated wait passes max_queue_wait_s or the deadline; "
            "tenant_cap: the API key's cap on images in flight) and service tier", ["reason", "tier"],
            registry=registry)
        self.admitted_images = Counter(
            "glm_router_admitted_images", "Images admitted, by service tier and tenant (an API key's name, never "
            "the key; 'anonymous' without keys)", ["tier", "tenant"], registry=registry)
        self.queue_wait = Histogram(
            "glm_router_queue_wait_seconds", "Time a stage job waited in this router for a worker slot, by stage and "
            "service tier", ["stage", "tier"], buckets=LATENCY_BUCKETS, registry=registry)
        self.workers_refused = Counter(
            "glm_router_workers_refused", "Worker registrations refused, by reason: config_mismatch once per worker and "
            "config; curve_* (bus security) every refused handshake",
            ["reason"], registry=registry)
        self.result_cache = Counter(
            "glm_router_result_cache_lookups", "Exact-repeat cache look-ups (requests with an explicit seed), by outcome",
            ["outcome"], registry=registry)
        self.result_cache_bytes = Gauge("glm_router_result_cache_bytes", "Image bytes held by the exact-repeat cache",
                                        registry=registry)
        self.pending_images = Gauge("glm_router_pending_images", "Images admitted and not finished", registry=registry)
        for stage in Stage:
            self.job_seconds.labels(stage=stage.value)
            for reason in RETRY_REASONS:
                self.job_retries.labels(stage=stage.value, reason=reason)
        for outcome in IMAGE_OUTCOMES:
            self.images.labels(outcome=outcome)
        for tier in SERVICE_TIERS:
            for reason in REJECT_REASONS:
                self.rejected.labels(reason=reason, tier=tier)
            for stage in Stage:
                self.queue_wait.labels(stage=stage.value, tier=tier)
        for outcome in ("hit", "miss"):
            self.result_cache.labels(outcome=outcome)
        for reason in WORKER_REFUSAL_REASONS:
            self.workers_refused.labels(reason=reason)

    def watch_stages(self, snapshot: Callable[[], Mapping[Stage, StageSnapshot]]) -> None:
        """Export `snapshot()` (called at every scrape, on the event loop) as the per-stage families."""
        self.registry.register(_StageCollector(snapshot))
