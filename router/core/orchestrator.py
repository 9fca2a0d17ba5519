"""Runs a request through the stages: AR job, then DiT job, per image, with retries and deadlines.

For every image the orchestrator builds one `original_prompt` carrying the size
both ways (`height`/`width` and `mm_processor_kwargs.target_h/target_w`, the
second derived from the first); stage 0 gets `mm_processor_kwargs` on its
prompt and stage 1 gets the `original_prompt`. Each stage reports the size it
used, and a disagreement is an error rather than a noisy image.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from common.protocol import (
    ARJob,
    ARPrompt,
    ARResult,
    ARSampling,
    DiTJob,
    DiTResult,
    ErrorCode,
    JobError,
    JobPayload,
    JobProgress,
    JobRequest,
    JobResult,
    OriginalPrompt,
    Stage,
)
from common.sizes import token_layout
from common.stage_config import StageConfig
from router.core.bus import RouterBus, WorkerLost
from router.core.errors import DeadlineExceeded, InvalidRequest, NoLiveWorkers, Overloaded, StageFailed
from router.core.image_request import (
    MAX_RANDOM_SEED,
    EventListener,
    GeneratedImage,
    GenerationEvent,
    ImageFinished,
    ImageRequest,
    PartialImage,
    StageProgress,
)
from router.core.metrics import RouterMetrics, StageSnapshot
from router.core.result_cache import ResultCache, result_key
from router.core.service_discovery import ScrapeTargetGroup, scrape_target_groups
from router.core.worker_pool import LOSS_REASONS, WorkerPool, WorkerState

logger = logging.getLogger(__name__)

# Replies that say "another worker may do it": re-dispatch without counting a failure,
# up to this many times per job, so a busy fleet can't bounce a job forever.
_MAX_BOUNCES = 50
_BOUNCE = ErrorCode.OVERLOADED.value

R = TypeVar("R", ARResult, DiTResult)


class _Retryable(Exception):
    """One attempt failed in a way another attempt (on another worker) may fix."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # the metrics label: worker_lost, overloaded, internal, cancelled
        self.message = message


def _classify_error(stage: Stage, reply: JobError) -> Exception:
    """What a worker's error reply means for the request: final (a ServiceError) or retryable."""
    if reply.code == ErrorCode.BAD_REQUEST:
        return InvalidRequest(f"{stage.value} stage rejected the request: {reply.message}")
    if reply.code == ErrorCode.TIMEOUT:
        return DeadlineExceeded(reply.message)
    return _Retryable(reply.code.value, f"worker {reply.worker_id}: {reply.message}")


def preview_steps(num_steps: int, partial_images: int) -> list[int]:
    """Evenly spaced denoising steps to preview after, for `partial_images` previews.

    Only steps 1..num_steps-2 qualify: step 0 has no previous latents to estimate the clean
    image from, and the last step is the final image. Few steps give fewer previews."""
    candidates = range(1, num_steps - 1)
    if partial_images <= 0 or not candidates:
        return []
    picks = {round((j + 1) * num_steps / (partial_images + 1)) - 1 for j in range(partial_images)}
    return sorted({min(max(step, candidates[0]), candidates[-1]) for step in picks})


def _ignore(event: GenerationEvent) -> None:
    pass


@dataclass
class _ImageRun:
    """One image of a request on its way through the stages."""

    request: ImageRequest
    index: int
    seed: int
    deadline_at: float
    emit: EventListener
    partial_images_sent: int = 0

    def on_progress(self, stage: Stage) -> Callable[[JobProgress], None] | None:
        """What to do with the workers' progress messages of this image's `stage` job."""
        if not (self.request.progress or self.request.partial_images):
            return None

        def forward(progress: JobProgress) -> None:
            if progress.preview is not None:
                self.emit(PartialImage(self.index, self.partial_images_sent, progress.preview))
                self.partial_images_sent += 1
            elif self.request.progress:
                self.emit(StageProgress(self.index, stage.value, progress.done, progress.total))

        return forward


class Orchestrator:
    """Turns ImageRequests into stage jobs on the bus (the router's ImageBackend)."""

    def __init__(self, config: StageConfig, bus: RouterBus, pool: WorkerPool, metrics: RouterMetrics, model_name: str):
        self.config = config
        self.bus = bus
        self.pool = pool
        self.metrics = metrics
        self.model_name = model_name
        self.pending_images = 0
        self._recent_image_s = 10.0  # EMA of image latency, for Retry-After
        self.results = ResultCache(config.router.result_cache_bytes, metrics)
        # Per stage, the jobs waiting for a free worker slot, oldest first.
        self._waiting: dict[Stage, list[object]] = {stage: [] for stage in Stage}
        self._config_fingerprint = config.fingerprint()
        # Read at scrape time (on the event loop, which owns this state), so the gauges are exact.
        metrics.watch_stages(self.stage_snapshots)

    def models(self) -> list[str]:
        return [self.model_name]

    def live_workers(self) -> dict[str, int]:
        return self.pool.counts()

    def stage_snapshots(self) -> dict[Stage, StageSnapshot]:
        """Per stage: workers, slots in use and free, jobs waiting for a slot, churn (the autoscaling metrics)."""
        pool = self.pool
        return {
            stage: StageSnapshot(
                live_workers=len(pool.live(stage)),
                slots=pool.capacity(stage),
                busy_slots=pool.busy_slots(stage),
                queued_jobs=len(self._waiting[stage]),
                registrations=pool.registrations[stage],
                losses={reason: pool.losses[stage, reason] for reason in LOSS_REASONS},
            )
            for stage in Stage
        }

    def metrics_targets(self) -> list[ScrapeTargetGroup]:
        """Where Prometheus can scrape each registered worker (GET /metrics/targets)."""
        return scrape_target_groups(w.info for w in self.pool.workers.values())

    async def generate(self, request: ImageRequest, listener: EventListener | None = None) -> list[GeneratedImage]:
        """Generate `request.n` images (seeds seed, seed+1, ...). Raises ServiceError subclasses;
        cancelling the caller cancels every job on the workers. `listener` sees the
        GenerationEvents (see ImageBackend.generate)."""
        self._admit(request)
        emit = listener or _ignore
        ahead = self.pending_images
        self.pending_images += request.n
        self.metrics.pending_images.set(self.pending_images)
        deadline_at = time.monotonic() + self.config.router.request_deadline_s
        base_seed = self._base_seed(request)
        runs = [_ImageRun(request, i, base_seed + i, deadline_at, emit) for i in range(request.n)]
        for run in runs:
            emit(StageProgress(run.index, "queued", position=ahead + run.index))
        tasks = [asyncio.create_task(self._one_image(run)) for run in runs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.pending_images -= request.n
            self.metrics.pending_images.set(self.pending_images)

    def _base_seed(self, request: ImageRequest) -> int:
        """The request's seed, else the stage config's default, else a fresh random one, so two
        identical calls without a seed give two different images (the seeds are returned)."""
        if request.seed is not None:
            return request.seed
        default = self.config.ar.default_sampling_params.seed
        if default is not None:
            return default
        return secrets.randbelow(MAX_RANDOM_SEED - request.n + 2)

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
        """The one description of image `seed` that every stage sees (the size is derived both ways)."""
        dit_defaults = self.config.dit.default_sampling_params
        steps = request.num_inference_steps
        if steps is None:
            steps = (dit_defaults.num_inference_steps if request.quality == "auto"
                     else getattr(dit_defaults.quality_steps, request.quality))
        return OriginalPrompt(
            prompt=request.prompt,
            height=request.size.height,
            width=request.size.width,
            seed=seed,
            num_inference_steps=steps,
            guidance_scale=dit_defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            negative_prompt=request.negative_prompt,
            condition_images=list(request.condition_images),
            output_format=request.output_format,
            output_compression=request.output_compression,
        )

    def _ar_sampling(self, request: ImageRequest, seed: int) -> ARSampling:
        defaults = self.config.ar.default_sampling_params
        return ARSampling(
            temperature=defaults.temperature if request.ar_temperature is None else request.ar_temperature,
            top_p=defaults.top_p if request.ar_top_p is None else request.ar_top_p,
            top_k=defaults.top_k,
            seed=seed,
        )

    async def _one_image(self, run: _ImageRun) -> GeneratedImage:
        request, index, seed = run.request, run.index, run.seed
        started = time.monotonic()
        original = self.build_original_prompt(request, seed)
        sampling = self._ar_sampling(request, seed)
        cache_key = None
        if request.seed is not None and self.results.enabled:  # only an explicit seed can be asked for again
            cache_key = result_key(original, sampling.temperature, sampling.top_p, sampling.top_k, self.model_name,
                                   self._config_fingerprint)
            cached = self.results.get(cache_key)
            if cached is not None:
                logger.info("[%s] image %d (seed %d, %s) answered from the result cache", request.log_tag, index,
                            seed, request.size)
                self.metrics.images.labels(outcome="cached").inc()
                run.emit(ImageFinished(index, cached))
                return cached
        ar_job = ARJob(
            prompt=ARPrompt(prompt=original.prompt, mm_processor_kwargs=original.mm_processor_kwargs, images=original.condition_images),
            sampling=sampling,
        )
        try:
            ar, ar_timings = await self._run_stage(Stage.AR, run, ar_job, ARResult)
            if ar.size != request.size:
                raise StageFailed(f"AR stage used size {ar.size} but {request.size} was requested")
            if request.progress:
                tokens = token_layout(request.size, image_to_image=bool(request.condition_images)).tokens_to_generate
                run.emit(StageProgress(index, "ar", tokens, tokens, seconds=round(time.monotonic() - started, 4)))
            dit_started = time.monotonic()
            dit_job = DiTJob(original_prompt=original, prior_token_ids=ar.prior_token_ids,
                             prior_token_image_ids=ar.prior_token_image_ids,
                             preview_steps=preview_steps(original.num_inference_steps, request.partial_images))
            dit, dit_timings = await self._run_stage(Stage.DIT, run, dit_job, DiTResult)
            if dit.size != request.size:
                raise StageFailed(f"DiT stage used size {dit.size} but {request.size} was requested")
            if request.progress:
                steps = original.num_inference_steps
                run.emit(StageProgress(index, "dit", steps, steps, seconds=round(time.monotonic() - dit_started, 4)))
        except asyncio.CancelledError:
            self.metrics.images.labels(outcome="cancelled").inc()
            raise
        except Exception:
            self.metrics.images.labels(outcome="failed").inc()
            raise
        total = time.monotonic() - started
        self._recent_image_s = 0.8 * self._recent_image_s + 0.2 * total
        self.metrics.images.labels(outcome="ok").inc()
        logger.info("[%s] image %d (seed %d, %s) done in %.2fs", request.log_tag, index, seed, request.size, total)
        image = GeneratedImage(
            image=dit.image,
            output_format=dit.output_format,
            seed=seed,
            size=dit.size,
            timings={
                "ar_s": round(ar_timings.get("ar_s", 0.0), 4),
                "dit_s": round(dit_timings.get("dit_s", 0.0), 4),
                "total_s": round(total, 4),
            },
            stage_sizes={"ar": ar.size, "dit": dit.size},
        )
        if cache_key is not None:
            self.results.put(cache_key, image)
        run.emit(ImageFinished(index, image))
        return image

    async def _run_stage(self, stage: Stage, run: _ImageRun, payload: JobPayload, result_type: type[R]) -> tuple[R, dict[str, float]]:
        """Run one stage job to a result of `result_type`, re-dispatching while retries allow."""
        request = run.request
        started = time.monotonic()
        failures = bounces = 0
        last_error = "workers kept refusing"
        for attempt in itertools.count():
            job_id = f"{request.request_id}.{run.index}.{stage.value}.{attempt}"
            try:
                result = await self._dispatch_once(stage, run, job_id, payload)
            except _Retryable as retry:
                self.metrics.job_retries.labels(stage=stage.value, reason=retry.reason).inc()
                if retry.reason == _BOUNCE:
                    bounces += 1
                    if bounces > _MAX_BOUNCES:
                        break
                    continue
                failures += 1
                last_error = retry.message
                logger.warning("[%s] %s stage: %s; re-dispatching (%d/%d)", request.log_tag, stage.value,
                               retry.message, failures, self.config.router.max_retries)
                if request.progress:
                    run.emit(StageProgress(run.index, "retry", reason=f"{stage.value} stage: {retry.reason}"))
                if failures > self.config.router.max_retries:
                    break
                continue
            self.metrics.job_seconds.labels(stage=stage.value).observe(time.monotonic() - started)
            if not isinstance(result.payload, result_type):
                raise StageFailed(f"{stage.value} worker {result.worker_id} answered with a {result.payload.stage} result")
            return result.payload, result.timings
        raise StageFailed(f"{stage.value} stage failed after {failures} attempt(s): {last_error}")

    async def _dispatch_once(self, stage: Stage, run: _ImageRun, job_id: str, payload: JobPayload) -> JobResult:
        """Send one attempt to the least-loaded live worker and wait for its reply.

        Returns the result; raises `_Retryable` when another attempt may succeed, and a
        ServiceError when none can."""
        request, deadline_at = run.request, run.deadline_at
        remaining = deadline_at - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(
                f"request exceeded its {self.config.router.request_deadline_s:.0f}s deadline in the {stage.value} stage")
        worker = await self._acquire(stage, deadline_at)
        timeout = min(self.config.stage(stage).timeouts.job_deadline_s, remaining)
        job = JobRequest(job_id=job_id, request_id=request.request_id, client_request_id=request.client_request_id,
                         deadline_s=timeout, payload=payload, progress=request.progress)
        future = await self.bus.submit(worker, job, run.on_progress(stage))
        try:
            # The worker enforces the deadline itself; the margin covers a worker that can't.
            reply = await asyncio.wait_for(asyncio.shield(future), timeout=timeout + 2 * self.config.bus.peer_timeout_s)
        except asyncio.CancelledError:
            logger.info("[%s] cancelling %s job %s on %s", request.log_tag, stage.value, job_id, worker.info.worker_id)
            await self.bus.cancel(job_id)
            raise
        except asyncio.TimeoutError:
            await self.bus.cancel(job_id)
            raise DeadlineExceeded(f"{stage.value} stage did not answer within {timeout:.0f}s") from None
        except WorkerLost as exc:
            raise _Retryable("worker_lost", str(exc)) from None
        if isinstance(reply, JobResult):
            return reply
        raise _classify_error(stage, reply)

    async def _acquire(self, stage: Stage, deadline_at: float) -> WorkerState:
        """Wait, first come first served, for a free slot on a live worker of the stage. With no
        live worker at all for `no_worker_grace_s`, fail fast with 503 naming the stage."""
        grace = self.config.router.no_worker_grace_s
        no_worker_since: float | None = None
        line = self._waiting[stage]
        ticket = object()
        line.append(ticket)
        try:
            while True:
                # Only the oldest waiters may take the free slots: any wake-up reaches every waiter,
                # and without this the newest could take a slot ahead of those waiting longest.
                if line.index(ticket) < self.pool.free_slots(stage):
                    worker = self.pool.pick(stage)
                    if worker is not None:
                        return worker
                no_worker_since = self._check_waiting(stage, deadline_at, grace, no_worker_since)
                # Woken by any registration or finished job; the timeout re-checks liveness.
                await self.bus.wait_for_slots(min(0.5, max(deadline_at - time.monotonic(), 0.01)))
        finally:
            line.remove(ticket)
            self.bus.notify_slots()  # the line moved: the next waiters may now be among the oldest

    def _check_waiting(self, stage: Stage, deadline_at: float, grace: float, no_worker_since: float | None) -> float | None:
        """Raise when waiting for `stage` must end; return since when no worker has been live."""
        now = time.monotonic()
        if self.pool.live(stage):
            no_worker_since = None
        else:
            no_worker_since = no_worker_since or now
            if now - no_worker_since >= grace:
                raise NoLiveWorkers(f"no live {stage.value} worker is registered; start one or retry later", retry_after_s=5)
        if now >= deadline_at:
            raise DeadlineExceeded(f"request deadline passed while waiting for a free {stage.value} worker")
        return no_worker_since
