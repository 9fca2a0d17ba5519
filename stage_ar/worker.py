"""AR worker: serves stage 0 (prompt + size -> prior token grid) on the bus."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
from PIL import Image

from common.metrics import WorkerMetrics
from common.protocol import ARJob, ARResult, JobRequest, Stage
from common.sizes import Grid, ImageSize, token_layout
from common.stage_config import ARStageConfig
from common.worker_main import WorkerOptions, serve_stage_worker
from common.worker_runtime import JobProgressReporter, JobRejected
from stage_ar.engine import AREngine, ARGenerationRequest

logger = logging.getLogger(__name__)


def load_engine(model_path: str, stage: ARStageConfig, device: str) -> AREngine:
    """The engine the stage config names."""
    logger.info("loading AR engine=%s from %s on %s", stage.engine, model_path, device)
    if stage.engine == "vllm":
        from stage_ar.vllm_engine import VllmAREngine

        return VllmAREngine(model_path, stage.engine_args, device)
    from stage_ar.transformers_engine import TransformersAREngine

    return TransformersAREngine(model_path, stage.engine_args, device)


def checked_ar_job(job: JobRequest) -> tuple[ARJob, ImageSize]:
    """The AR payload of `job` and its target size; JobRejected for a job this stage cannot serve."""
    ar = job.payload
    if not isinstance(ar, ARJob):
        raise JobRejected(f"AR worker got a {ar.stage} job")
    size = ar.prompt.mm_processor_kwargs.size
    if not size.on_grid:
        raise JobRejected(f"target size {size} is not a positive multiple of 32 on both sides")
    return ar, size


class ARStageHandler:
    def __init__(self, engine: AREngine, metrics: WorkerMetrics):
        self.engine = engine
        self.metrics = metrics

    async def close(self) -> None:
        await self.engine.shutdown()

    async def run(self, job: JobRequest, progress: JobProgressReporter) -> tuple[ARResult, dict[str, float]]:
        ar, size = checked_ar_job(job)
        try:
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in ar.prompt.images]
        except Exception as exc:
            raise JobRejected(f"condition image is not a decodable image: {exc}") from exc
        request = ARGenerationRequest(
            job_id=job.job_id,
            prompt=ar.prompt.prompt,
            size=size,
            condition_images=images,
            temperature=ar.sampling.temperature,
            top_p=ar.sampling.top_p,
            top_k=ar.sampling.top_k,
            seed=ar.sampling.seed,
        )
        total = token_layout(size, image_to_image=bool(images)).tokens_to_generate
        on_tokens = (lambda done: progress.steps(done, total)) if progress.wants_steps else None
        started = time.monotonic()
        output = await self.engine.generate(request, on_tokens)
        elapsed = time.monotonic() - started
        n_tokens = int(output.generated_token_ids.shape[0])
        self.metrics.tokens.inc(n_tokens)
        # Report the size the grid really has, so the router can check it against the request.
        used = ImageSize.of_grid(Grid(*output.prior_token_ids.shape))
        result = ARResult(
            prior_token_ids=np.ascontiguousarray(output.prior_token_ids, dtype=np.int64),
            prior_token_image_ids=[np.ascontiguousarray(g, dtype=np.int64) for g in output.prior_token_image_ids],
            height=used.height,
            width=used.width,
        )
        peak = self.engine.peak_memory_gib()
        logger.info("[%s] job %s: %d tokens in %.2fs (%.0f tok/s)%s", job.log_tag, job.job_id, n_tokens, elapsed,
                    n_tokens / max(elapsed, 1e-9), "" if peak is None else f"; peak GPU memory {peak:.2f} GiB")
        return result, {"ar_s": elapsed}


async def serve_ar_worker(options: WorkerOptions) -> None:
    """Load the AR engine, then join the bus."""
    stage = options.config.ar
    await serve_stage_worker(
        Stage.AR,
        options,
        capacity=stage.engine_args.max_num_seqs,
        make_handler=lambda metrics: ARStageHandler(load_engine(options.model_path, stage, options.device), metrics),
    )
