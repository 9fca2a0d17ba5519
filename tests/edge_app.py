"""The router's HTTP edge in-process, for tests of properties that live in the app, not the server.

`in_process_edge()` builds the real app (`router.edge.app.create_app`: the real middlewares, error
handlers, body readers and schemas) on the real tiny stage config, around `NoWorkersBackend`, and
drives it with Starlette's TestClient: no process, no socket, a request in a millisecond or two.
A body that passes validation ends in the 503 a router without workers answers, naming the stage,
exactly as over the wire.

What this cannot test: the connection-level limits (header deadline and size, connection cap,
malformed HTTP framing, a Content-Length that lies, a body cut off) live in the uvicorn protocol
(router/edge/http_limits.py), under the app; those need a real router process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from common.protocol import Stage
from common.stage_config import StageConfig, load_stage_config
from harness.local_cluster import TINY_STAGE_CONFIG, merge_stage_overrides
from router.edge.app import create_app
from router.core.errors import NoLiveWorkers
from router.core.image_request import EventListener, GeneratedImage, ImageBackend, ImageRequest, StageProgress
from router.core.service_discovery import ScrapeTargetGroup

MODEL_NAME = "glm-image-tiny"  # what harness.local_cluster's routers serve


class NoWorkersBackend:
    """An ImageBackend that behaves as the orchestrator (router/core/orchestrator.py) does while no
    worker has registered and `no_worker_grace_s` is 0: a request is admitted (one "queued" event
    per image), then fails at once with the 503 naming the AR stage. It keeps the requests that
    reached it, so a test can see what passed validation."""

    def __init__(self, config: StageConfig, model_name: str = MODEL_NAME):
        self.config = config
        self.model_name = model_name
        self.requests: list[ImageRequest] = []

    async def generate(self, request: ImageRequest, listener: EventListener | None = None) -> list[GeneratedImage]:
        self.requests.append(request)
        for index in range(request.n):
            if listener is not None:
                listener(StageProgress(index, "queued", position=index))
        # The orchestrator's own words (Orchestrator._check_waiting): the AR stage runs first.
        raise NoLiveWorkers(f"no live {Stage.AR.value} worker is registered; start one or retry later",
                            retry_after_s=5)

    def live_workers(self) -> dict[str, int]:
        return {stage.value: 0 for stage in Stage}

    def models(self) -> list[str]:
        return [self.model_name]

    def metrics_targets(self) -> list[ScrapeTargetGroup]:
        return []  # one group per live worker that serves metrics: none


def edge_stage_config(overrides: dict | None = None) -> StageConfig:
    """The tiny CPU stage config (stage_configs/glm_image_tiny_cpu.yaml) with `overrides` deep-merged
    in, validated like a file: `{"limits": {"max_upload_bytes": 262144}}`. As in
    harness.local_cluster.write_stage_config, dicts merge key by key, `stage_args` element-wise."""
    config = load_stage_config(TINY_STAGE_CONFIG)
    if not overrides:
        return config
    return StageConfig.model_validate(merge_stage_overrides(config.model_dump(), overrides))


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class InProcessEdge:
    """The app, its backend and registry, a client bound to it, and the errors the router logged."""

    app: FastAPI
    backend: NoWorkersBackend
    registry: CollectorRegistry
    client: TestClient
    _errors: _ErrorRecords = field(repr=False)

    def statuses(self) -> set[str]:
        """Every HTTP status the edge has answered (glm_router_http_requests_total), as strings."""
        return {sample.labels["status"] for family in self.registry.collect()
                if family.name == "glm_router_http_requests" for sample in family.samples
                if sample.name == "glm_router_http_requests_total"}

    def logged_errors(self) -> list[str]:
        """ERROR lines the router's loggers wrote (an unhandled error becomes a logged 500)."""
        return [record.getMessage() for record in self._errors.records]


@contextmanager
def in_process_edge(overrides: dict | None = None, **client_kwargs) -> Iterator[InProcessEdge]:
    """The router's app on the tiny stage config (with `overrides`, see `edge_stage_config`) around
    a NoWorkersBackend, with a TestClient (httpx's API; `client_kwargs` go to it) open on it.

    The client re-raises what escapes the app, so a bug that slips past the router's last-resort
    500 fails the test with its traceback."""
    backend = NoWorkersBackend(edge_stage_config(overrides))
    typed: ImageBackend = backend  # the fake must stay a full ImageBackend
    registry = CollectorRegistry()
    app = create_app(typed, registry)
    errors = _ErrorRecords()
    router_logger = logging.getLogger("router")
    router_logger.addHandler(errors)
    try:
        with TestClient(app, **client_kwargs) as client:
            yield InProcessEdge(app, backend, registry, client, errors)
    finally:
        router_logger.removeHandler(errors)
