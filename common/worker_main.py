"""The worker process entry shared by both stages: metrics, model load, registration, serve, drain."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable

from common.metrics import WorkerMetrics
from common.protocol import Stage, WorkerInfo
from common.stage_config import StageConfig
from common.worker_runtime import StageHandler, StageWorker, run_stage_worker


@dataclass(frozen=True)
class WorkerOptions:
    """How one worker process was asked to run (from the command line)."""

    model_path: str
    config: StageConfig
    routers: list[str]
    worker_id: str | None = None
    device: str = "cpu"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"  # the metrics port is this machine's only unless asked otherwise
    drain_grace_s: float = 30.0


async def serve_stage_worker(
    stage: Stage,
    options: WorkerOptions,
    capacity: int,
    make_handler: Callable[[WorkerMetrics], StageHandler],
) -> None:
    """Load the stage's model (via `make_handler`), then join the bus: registration means ready.
    Serves until SIGINT/SIGTERM, then drains."""
    worker_id = options.worker_id or f"{stage.value}-{socket.gethostname()}-{os.getpid()}"
    metrics = WorkerMetrics(stage.value, worker_id)
    if options.metrics_port:
        metrics.serve(options.metrics_port, options.metrics_host)
    handler = make_handler(metrics)
    info = WorkerInfo(
        worker_id=worker_id,
        stage=stage,
        model=options.model_path,
        capacity=capacity,
        pid=os.getpid(),
        host=socket.gethostname(),
        config_fingerprint=options.config.fingerprint(),
    )
    worker = StageWorker(info, options.routers, handler, options.config.bus, metrics)
    try:
        await run_stage_worker(worker, options.drain_grace_s)
    finally:
        close = getattr(handler, "close", None)
        if close is not None:
            await close()
