"""DiT worker: serves stage 1 (prior tokens + original prompt -> encoded image) on the bus."""

from __future__ import annotations

import logging
import time

from common.cancellable import run_cancellable
from common.protocol import DiTJob, DiTResult, JobRequest, LoraTarget, Stage
from common.worker_main import WorkerOptions, serve_stage_worker
from common.worker_runtime import JobProgressReporter, JobRejected
from stage_dit.lora import LoraMetrics
from stage_dit.pipeline_runner import DiTInputError, DiTPipelineRunner

logger = logging.getLogger(__name__)


class DiTStageHandler:
    def __init__(self, runner: DiTPipelineRunner):
        self.runner = runner

    async def run(self, job: JobRequest, progress: JobProgressReporter) -> tuple[DiTResult, dict[str, float]]:
        dit = job.payload
        if not isinstance(dit, DiTJob):
            raise JobRejected(f"DiT worker got a {dit.stage} job")
        started = time.monotonic()
        try:
            # Cancelling stops at the next denoising step, and only then frees the slot.
            result = await run_cancellable(lambda cancel: self.runner.run(dit, cancel, progress, job.log_tag))
        except DiTInputError as exc:
            raise JobRejected(str(exc)) from exc
        elapsed = time.monotonic() - started
        peak = self.runner.peak_memory_gib()
        loras = "".join(f"; LoRA {spec.name}@{spec.scale:g}" for spec in dit.loras)
        logger.info("[%s] job %s: %d steps at %dx%d in %.2fs%s%s", job.log_tag, job.job_id,
                    dit.original_prompt.num_inference_steps, result.width, result.height, elapsed, loras,
                    "" if peak is None else f"; peak GPU memory {peak:.2f} GiB")
        return result, {"dit_s": elapsed}

    @property
    def lora_targets(self) -> list[LoraTarget] | None:
        """The layers adapters may target, announced in the registration; None without an adapter folder."""
        return None if self.runner.lora is None else self.runner.lora.targets

    def loaded_loras(self) -> list[str]:
        """sha256 digests of the adapters loaded now (for heartbeats)."""
        return [] if self.runner.lora is None else list(self.runner.lora.loaded_digests)


async def serve_dit_worker(options: WorkerOptions) -> None:
    """Load the DiT pipeline (without AR components), then join the bus."""
    stage = options.config.dit
    await serve_stage_worker(
        Stage.DIT,
        options,
        # The pipeline runs one job at a time; more slots would only queue inside the worker.
        capacity=1,
        make_handler=lambda metrics: DiTStageHandler(DiTPipelineRunner(
            options.model_path, stage.engine_args, options.device, on_step=metrics.denoising_steps.inc,
            lora=options.config.lora, lora_metrics=LoraMetrics(metrics.registry, metrics.worker_id))),
    )
