"""Runs a request through the stages: AR job, then DiT job, per image, with retries and deadlines.

For every image the orchestrator builds one `original_prompt` carrying the size
both ways (`height`/`width` and `mm_processor_kwargs.target_h/target_w`); stage
0 gets `mm_processor_kwargs` on its prompt and stage 1 gets the
`original_prompt`. Each stage reports the size it used, and a disagreement is
an error rather than a noisy image.
"""

from __future__ import annotations

import asyncio
import logging
import time

from common.protocol import (
    ARJob,
    ARPrompt,
    ARResult,
    ARSampling,
    DiTJob,
    DiTResult,
    ErrorCode,
    JobError,
    JobRequest,
    JobResult,
    MMProcessorKwargs,
    OriginalPrompt,
    Stage,
)
from common.stage_config import StageConfig
from router.bus import RouterBus, WorkerLost
from router.errors import DeadlineExceeded, InvalidRequest, NoLiveWorkers, Overloaded, StageFailed
from router.image_request import GeneratedImage, ImageRequest
from router.metrics import RouterMetrics
from router.worker_pool import WorkerPool, WorkerState

logger = logging.getLogger(__name__)

# Replies that say "another worker may do it": re-dispatch without counting a failure,
# up to this many times per job, so a busy fleet can't bounce a job forever.
_MAX_BOUNCES = 50


class Orchestrator:
    def __init__(self, config: StageConfig, bus: RouterBus, pool: WorkerPool, metrics: RouterMetrics, model_name: str):
        self.config = config
        self.bus = bus
        self.pool = pool
        self.metrics = metrics
        self.model_name = model_name
        self.pending_images = 0
        self._recent_image_s = 10.0  # EMA of image latency, for Retry-After
        # Read at scrape time, so the gauge is never stale.
        for stage in Stage:
            metrics.live_workers.labels(stage=stage.value).set_function(lambda s=stage: len(pool.live(s)))

    def models(self) -> list[str]:
        return [self.model_name]

    def live_workers(self) -> dict[str, int]:
        return self.pool.counts()

    async def generate(self, request: ImageRequest) -> list[GeneratedImage]:
        """Generate `request.n` images (seeds seed, seed+1, ...). Raises ServiceError subclasses;
        cancelling the caller cancels every job on the workers."""
        self._admit(request)
        self.pending_images += request.n
        self.metrics.pending_images.set(self.pending_images)
        deadline_at = time.monotonic() + self.config.router.request_deadline_s
        base_seed = self.config.ar.default_sampling_params.seed if request.seed is None else request.seed
        tasks = [asyncio.create_task(self._one_image(request, i, base_seed + i, deadline_at)) for i in range(request.n)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.pending_images -= request.n
            self.metrics.pending_images.set(self.pending_images)

    def _admit(self, request: ImageRequest) -> None:
        """Queue up to the configured bound beyond the live AR capacity, then refuse with Retry-After."""
        capacity = self.pool.capacity(Stage.AR)
        bound = capacity + self.config.router.queue_limit_per_stage
        if capacity and self.pending_images + request.n > bound:
            self.metrics.rejected.inc()
            retry_after = max(1.0, self._recent_image_s * (self.pending_images / capacity) / 2)
            raise Overloaded(
                f"server is at capacity ({self.pending_images} images queued or running, limit {bound}); retry later",
                retry_after_s=round(retry_after),
            )

    def build_original_prompt(self, request: ImageRequest, seed: int) -> OriginalPrompt:
        dit_defaults = self.config.dit.default_sampling_params
        return OriginalPrompt(
            prompt=request.prompt,
            height=request.height,
            width=request.width,
            mm_processor_kwargs=MMProcessorKwargs(target_h=request.height, target_w=request.width),
            seed=seed,
            num_inference_steps=request.num_inference_steps or dit_defaults.num_inference_steps,
            guidance_scale=dit_defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            negative_prompt=request.negative_prompt,
            condition_images=list(request.condition_images),
            output_format=request.output_format,
        )

    async def _one_image(self, request: ImageRequest, index: int, seed: int, deadline_at: float) -> GeneratedImage:
        started = time.monotonic()
        rid = request.request_id
        original = self.build_original_prompt(request, seed)
        ar_defaults = self.config.ar.default_sampling_params
        ar_job = ARJob(
            prompt=ARPrompt(prompt=original.prompt, mm_processor_kwargs=original.mm_processor_kwargs, images=original.condition_images),
            sampling=ARSampling(temperature=ar_defaults.temperature, top_p=ar_defaults.top_p, top_k=ar_defaults.top_k, seed=seed),
        )
        try:
            ar_reply = await self._run_stage(Stage.AR, rid, index, ar_job, deadline_at)
            ar: ARResult = ar_reply.payload
            if (ar.target_h, ar.target_w) != (request.height, request.width):
                raise StageFailed(
                    f"AR stage used size {ar.target_w}x{ar.target_h} but {request.width}x{request.height} was requested"
                )
            dit_job = DiTJob(original_prompt=original, prior_token_ids=ar.prior_token_ids, prior_token_image_ids=ar.prior_token_image_ids)
            dit_reply = await self._run_stage(Stage.DIT, rid, index, dit_job, deadline_at)
            dit: DiTResult = dit_reply.payload
            if (dit.height, dit.width) != (request.height, request.width):
                raise StageFailed(f"DiT stage used size {dit.width}x{dit.height} but {request.width}x{request.height} was requested")
        except asyncio.CancelledError:
            self.metrics.images.labels(outcome="cancelled").inc()
            raise
        except Exception:
            self.metrics.images.labels(outcome="failed").inc()
            raise
        total = time.monotonic() - started
        self._recent_image_s = 0.8 * self._recent_image_s + 0.2 * total
        self.metrics.images.labels(outcome="ok").inc()
        logger.info("[%s] image %d (seed %d, %dx%d) done in %.2fs", rid, index, seed, request.width, request.height, total)
        return GeneratedImage(
            image=dit.image,
            output_format=dit.output_format,
            seed=seed,
            width=dit.width,
            height=dit.height,
            timings={
                "ar_s": round(ar_reply.timings.get("ar_s", 0.0), 4),
                "dit_s": round(dit_reply.timings.get("dit_s", 0.0), 4),
                "total_s": round(total, 4),
            },
            stage_sizes={"ar": [ar.target_h, ar.target_w], "dit": [dit.height, dit.width]},
        )

    async def _run_stage(self, stage: Stage, request_id: str, index: int, payload, deadline_at: float) -> JobResult:
        """Dispatch one stage job to the least-loaded live worker; retry on worker loss or failure."""
        stage_timeout = (self.config.ar if stage == Stage.AR else self.config.dit).timeouts.job_deadline_s
        failures = bounces = 0
        last_error = ""
        started = time.monotonic()
        for attempt in range(self.config.router.max_retries + _MAX_BOUNCES + 1):
            remaining = deadline_at - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"request exceeded its {self.config.router.request_deadline_s:.0f}s deadline in the {stage.value} stage")
            job_id = f"{request_id}.{index}.{stage.value}.{attempt}"
            worker = await self._acquire(stage, deadline_at)
            timeout = min(stage_timeout, remaining)
            job = JobRequest(job_id=job_id, request_id=request_id, deadline_s=timeout, payload=payload)
            future = await self.bus.submit(worker, job)
            try:
                # The worker enforces the deadline itself; the margin covers a worker that can't.
                reply = await asyncio.wait_for(asyncio.shield(future), timeout=timeout + 2 * self.config.bus.peer_timeout_s)
            except asyncio.CancelledError:
                logger.info("[%s] cancelling %s job on %s", request_id, stage.value, worker.info.worker_id)
                await self.bus.cancel(job_id)
                raise
            except asyncio.TimeoutError:
                await self.bus.cancel(job_id)
                raise DeadlineExceeded(f"{stage.value} stage did not answer within {timeout:.0f}s") from None
            except WorkerLost as exc:
                failures += 1
                last_error = str(exc)
                self.metrics.stage_retries.labels(stage=stage.value, reason="worker_lost").inc()
                logger.warning("[%s] %s; re-dispatching (%d/%d)", request_id, exc, failures, self.config.router.max_retries)
                if failures > self.config.router.max_retries:
                    break
                continue
            if isinstance(reply, JobResult):
                self.metrics.stage_seconds.labels(stage=stage.value).observe(time.monotonic() - started)
                return reply
            assert isinstance(reply, JobError)
            if reply.code == ErrorCode.BAD_REQUEST:
                raise InvalidRequest(f"{stage.value} stage rejected the request: {reply.message}")
            if reply.code == ErrorCode.TIMEOUT:
                raise DeadlineExceeded(reply.message)
            if reply.code == ErrorCode.OVERLOADED:
                bounces += 1
                self.metrics.stage_retries.labels(stage=stage.value, reason="overloaded").inc()
                if bounces > _MAX_BOUNCES:
                    break
                continue
            failures += 1
            last_error = f"worker {reply.worker_id}: {reply.message}"
            self.metrics.stage_retries.labels(stage=stage.value, reason=reply.code.value).inc()
            logger.warning("[%s] %s stage failed on %s: %s", request_id, stage.value, reply.worker_id, reply.message)
            if failures > self.config.router.max_retries:
                break
        raise StageFailed(f"{stage.value} stage failed after {failures} attempt(s): {last_error or 'workers kept refusing'}")

    async def _acquire(self, stage: Stage, deadline_at: float) -> WorkerState:
        """Wait for a free slot on a live worker of the stage. With no live worker at all for
        `no_worker_grace_s`, fail fast with 503 naming the stage."""
        grace = self.config.router.no_worker_grace_s
        no_worker_since: float | None = None
        while True:
            worker = self.pool.pick(stage)
            if worker is not None:
                return worker
            now = time.monotonic()
            if self.pool.live(stage):
                no_worker_since = None
            else:
                no_worker_since = no_worker_since or now
                if now - no_worker_since >= grace:
                    raise NoLiveWorkers(f"no live {stage.value} worker is registered; start one or retry later", retry_after_s=5)
            if now >= deadline_at:
                raise DeadlineExceeded(f"request deadline passed while waiting for a free {stage.value} worker")
            # Woken by any registration or finished job; the timeout re-checks liveness.
            await self.bus.wait_for_slots(min(0.5, max(deadline_at - now, 0.01)))
