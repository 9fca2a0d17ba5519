"""DiT worker: serves stage 1 (prior tokens + original prompt -> encoded image) on the bus."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time

from common.metrics import WorkerMetrics
from common.protocol import DiTJob, DiTResult, JobRequest, Stage, WorkerInfo
from common.stage_config import StageConfig
from common.worker_runtime import JobRejected, StageWorker, run_stage_worker
from stage_dit.pipeline_runner import DenoiseCancelled, DiTInputError, DiTPipelineRunner

logger = logging.getLogger(__name__)


class DiTStageHandler:
    def __init__(self, runner: DiTPipelineRunner):
        self.runner = runner

    async def run(self, job: JobRequest) -> tuple[DiTResult, dict[str, float]]:
        dit = job.payload
        if not isinstance(dit, DiTJob):
            raise JobRejected(f"DiT worker got a {dit.stage} job")
        cancel = threading.Event()
        started = time.monotonic()
        work = asyncio.ensure_future(asyncio.to_thread(self.runner.run, dit, cancel))
        try:
            result = await asyncio.shield(work)
        except asyncio.CancelledError:
            # Stop at the next denoising step, and only then free the slot.
            cancel.set()
            await asyncio.gather(work, return_exceptions=True)
            raise
        except DiTInputError as exc:
            raise JobRejected(str(exc)) from exc
        except DenoiseCancelled:
            raise asyncio.CancelledError() from None
        return result, {"dit_s": time.monotonic() - started}


async def serve_dit_worker(
    model_path: str,
    config: StageConfig,
    routers: list[str],
    worker_id: str | None = None,
    device: str = "cpu",
    metrics_port: int | None = None,
    drain_grace_s: float = 30.0,
) -> None:
    """Load the DiT pipeline (without AR components), then join the bus."""
    stage = config.dit
    worker_id = worker_id or f"dit-{socket.gethostname()}-{os.getpid()}"
    metrics = WorkerMetrics("dit", worker_id)
    if metrics_port:
        metrics.serve(metrics_port)
    runner = DiTPipelineRunner(model_path, stage.engine_args, device)
    info = WorkerInfo(
        worker_id=worker_id,
        stage=Stage.DIT,
        model=model_path,
        # The pipeline runs one job at a time; more slots would only queue inside the worker.
        capacity=1,
        pid=os.getpid(),
        host=socket.gethostname(),
    )
    worker = StageWorker(info, routers, DiTStageHandler(runner), config.bus, metrics)
    await run_stage_worker(worker, drain_grace_s)
