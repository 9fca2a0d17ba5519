"""AR worker: serves stage 0 (prompt + size -> prior token grid) on the bus."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
from PIL import Image

from common.metrics import WorkerMetrics
from common.protocol import ARJob, ARResult, JobRequest, Stage
from common.sizes import SIZE_MULTIPLE
from common.stage_config import ARStageConfig
from common.worker_main import WorkerOptions, serve_stage_worker
from common.worker_runtime import JobRejected
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


class ARStageHandler:
    def __init__(self, engine: AREngine, metrics: WorkerMetrics):
        self.engine = engine
        self.metrics = metrics

    async def close(self) -> None:
        await self.engine.shutdown()

    async def run(self, job: JobRequest) -> tuple[ARResult, dict[str, float]]:
        ar = job.payload
        if not isinstance(ar, ARJob):
            raise JobRejected(f"AR worker got a {ar.stage} job")
        size = ar.prompt.mm_processor_kwargs
        if size.target_h % SIZE_MULTIPLE or size.target_w % SIZE_MULTIPLE or min(size.target_h, size.target_w) <= 0:
            raise JobRejected(f"target size {size.target_w}x{size.target_h} is not a positive multiple of {SIZE_MULTIPLE}")
        try:
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in ar.prompt.images]
        except Exception as exc:
            raise JobRejected(f"condition image is not a decodable image: {exc}") from exc
        request = ARGenerationRequest(
            request_id=job.job_id,
            prompt=ar.prompt.prompt,
            height=size.target_h,
            width=size.target_w,
            condition_images=images,
            temperature=ar.sampling.temperature,
            top_p=ar.sampling.top_p,
            top_k=ar.sampling.top_k,
            seed=ar.sampling.seed,
        )
        started = time.monotonic()
        output = await self.engine.generate(request)
        elapsed = time.monotonic() - started
        n_tokens = int(output.generated_token_ids.shape[0])
        self.metrics.tokens.inc(n_tokens)
        grid_h, grid_w = output.prior_token_ids.shape
        result = ARResult(
            prior_token_ids=np.ascontiguousarray(output.prior_token_ids, dtype=np.int64),
            prior_token_image_ids=[np.ascontiguousarray(g, dtype=np.int64) for g in output.prior_token_image_ids],
            target_h=grid_h * SIZE_MULTIPLE,
            target_w=grid_w * SIZE_MULTIPLE,
            num_generated_tokens=n_tokens,
        )
        logger.info("[%s] %d tokens in %.2fs (%.0f tok/s)", job.request_id, n_tokens, elapsed, n_tokens / max(elapsed, 1e-9))
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
