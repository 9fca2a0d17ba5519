"""AR worker: serves stage 0 (prompt + size -> prior token grid) on the bus."""

from __future__ import annotations

import io
import logging
import os
import socket
import time

import numpy as np
from PIL import Image

from common.metrics import WorkerMetrics
from common.protocol import ARJob, ARResult, JobRequest, Stage, WorkerInfo
from common.sizes import SIZE_MULTIPLE
from common.stage_config import ARStageConfig, StageConfig
from common.worker_runtime import JobRejected, StageWorker, run_stage_worker
from stage_ar.engine import AREngine, ARGenerationRequest

logger = logging.getLogger(__name__)


def load_engine(model_path: str, stage: ARStageConfig, device: str) -> AREngine:
    """The engine the stage config names."""
    if stage.engine == "vllm":
        from stage_ar.vllm_engine import VllmAREngine

        return VllmAREngine(model_path, stage.engine_args, device)
    from stage_ar.transformers_engine import TransformersAREngine

    return TransformersAREngine(model_path, stage.engine_args, device)


class ARStageHandler:
    def __init__(self, engine: AREngine, metrics: WorkerMetrics):
        self.engine = engine
        self.metrics = metrics

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


async def serve_ar_worker(
    model_path: str,
    config: StageConfig,
    routers: list[str],
    worker_id: str | None = None,
    device: str = "cpu",
    metrics_port: int | None = None,
    drain_grace_s: float = 30.0,
) -> None:
    """Load the AR engine, then join the bus (registration means ready)."""
    stage = config.ar
    worker_id = worker_id or f"ar-{socket.gethostname()}-{os.getpid()}"
    metrics = WorkerMetrics("ar", worker_id)
    if metrics_port:
        metrics.serve(metrics_port)
    engine = load_engine(model_path, stage, device)
    info = WorkerInfo(
        worker_id=worker_id,
        stage=Stage.AR,
        model=model_path,
        capacity=stage.engine_args.max_num_seqs,
        pid=os.getpid(),
        host=socket.gethostname(),
    )
    worker = StageWorker(info, routers, ARStageHandler(engine, metrics), config.bus, metrics)
    try:
        await run_stage_worker(worker, drain_grace_s)
    finally:
        await engine.shutdown()
