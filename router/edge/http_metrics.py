"""Prometheus metrics of the HTTP edge: requests by endpoint and status, latency, in flight.

Endpoints are labelled with the route template (`/v1/images/generations`), never
the raw path, so a scan of random URLs cannot blow up label cardinality.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Image requests take seconds to minutes; probes take microseconds.
_LATENCY_BUCKETS = (0.005, 0.05, 0.25, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class HttpMetrics:
    """The HTTP metrics, registered on the registry the router exposes at /metrics."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "glm_router_http_requests", "HTTP requests by endpoint, method and status code.",
            ["endpoint", "method", "status"], registry=registry)
        self.latency = Histogram(
            "glm_router_http_request_duration_seconds", "Time from request start to response end.",
            ["endpoint", "method"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge(
            "glm_router_http_requests_in_flight", "HTTP requests being served.",
            ["endpoint"], registry=registry)
        self.client_disconnects = Counter(
            "glm_router_http_client_disconnects", "Requests cancelled because the client went away.",
            ["endpoint"], registry=registry)

        self.streams = Counter(
            "glm_router_http_streams", "Streamed (server-sent events) responses started.", ["endpoint"],
            registry=registry)
        self.stream_first_event = Histogram(
            "glm_router_http_stream_first_event_seconds", "Time from the request to the first event sent.",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.stream_events = Counter(
            "glm_router_http_stream_events",
            "Events sent on streams, by kind (partial_image: a preview the DiT decoded; completed; progress).",
            ["kind"], registry=registry)
        for kind in ("partial_image", "completed", "progress"):  # known up front: exported at 0
            self.stream_events.labels(kind)

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint, method).observe(seconds)
