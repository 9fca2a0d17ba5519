"""DiT worker: serves stage 1 (prior tokens + original prompt -> encoded image) on the bus."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from common.protocol import DiTJob, DiTResult, JobRequest, Stage
from common.worker_main import WorkerOptions, serve_stage_worker
from common.worker_runtime import JobRejected
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


async def serve_dit_worker(options: WorkerOptions) -> None:
    """Load the DiT pipeline (without AR components), then join the bus."""
    stage = options.config.dit
    await serve_stage_worker(
        Stage.DIT,
        options,
        # The pipeline runs one job at a time; more slots would only queue inside the worker.
        capacity=1,
        make_handler=lambda metrics: DiTStageHandler(DiTPipelineRunner(options.model_path, stage.engine_args, options.device)),
    )
