"""The per-image script: AR job, check, DiT job, check; like a diffusers pipeline's `__call__`.

For every image the orchestrator builds one `original_prompt` carrying the size
both ways (`height`/`width` and `mm_processor_kwargs.target_h/target_w`, the
second derived from the first); stage 0 gets `mm_processor_kwargs` on its
prompt and stage 1 gets the `original_prompt`. Each stage reports the size it
used, and a disagreement is an error rather than a noisy image. Waiting,
worker choice, retries and deadlines are the Scheduler's (router/core/scheduler.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Callable

from common.protocol import (
    ARJob,
    ARPrompt,
    ARResult,
    ARSampling,
    DiTJob,
    DiTResult,
    JobPayload,
    JobProgress,
    OriginalPrompt,
    Stage,
)
from common.sizes import token_layout
from common.stage_config import StageConfig
from router.core.errors import StageFailed
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
from router.core.lora_registry import LoraRegistry
from router.core.metrics import RouterMetrics
from router.core.result_cache import ResultCache, result_key
from router.core.scheduler import AdmittedImage, Scheduler, StageJob
from router.core.service_discovery import ScrapeTargetGroup, scrape_target_groups

logger = logging.getLogger(__name__)


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
    admitted: AdmittedImage
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

    def on_retry(self, stage: Stage) -> Callable[[str], None] | None:
        if not self.request.progress:
            return None
        return lambda reason: self.emit(StageProgress(self.index, "retry", reason=f"{stage.value} stage: {reason}"))

    def stage_job(self, stage: Stage, payload: JobPayload) -> StageJob:
        return StageJob(stage=stage, request=self.request, image=self.admitted, image_index=self.index,
                        payload=payload, deadline_at=self.deadline_at, on_progress=self.on_progress(stage),
                        on_retry=self.on_retry(stage))


class Orchestrator:
    """Turns ImageRequests into stage jobs (the router's ImageBackend); the Scheduler runs them."""

    def __init__(self, config: StageConfig, scheduler: Scheduler, metrics: RouterMetrics, model_name: str):
        self.config = config
        self.scheduler = scheduler
        self.pool = scheduler.pool
        self.metrics = metrics
        self.model_name = model_name
        self.results = ResultCache(config.router.result_cache_bytes, metrics)
        self._config_fingerprint = config.fingerprint()
        self.loras = LoraRegistry(config.lora, model_name, targets=self._dit_lora_targets)
        # The tasks running `generate` now, so a shutdown can cancel them before the workers go.
        self._running: set[asyncio.Task] = set()
        # Read at scrape time (on the event loop, which owns this state), so the gauges are exact.
        metrics.watch_stages(scheduler.stage_snapshots)

    def models(self) -> list[str]:
        return [self.model_name]

    def live_workers(self) -> dict[str, int]:
        return self.pool.counts()

    def _dit_lora_targets(self):
        """The layers LoRA adapters may target, as a live DiT worker announced them (None while none has)."""
        return next((w.info.lora_targets for w in self.pool.live(Stage.DIT) if w.info.lora_targets is not None), None)

    def metrics_targets(self) -> list[ScrapeTargetGroup]:
        """Where Prometheus can scrape each registered worker (GET /metrics/targets)."""
        return scrape_target_groups(w.info for w in self.pool.workers.values())

    async def generate(self, request: ImageRequest, listener: EventListener | None = None) -> list[GeneratedImage]:
        """Generate `request.n` images (seeds seed, seed+1, ...). Raises ServiceError subclasses;
        cancelling the caller cancels every job on the workers. `listener` sees the
        GenerationEvents (see ImageBackend.generate)."""
        admission = self.scheduler.admit(request)
        current = asyncio.current_task()
        self._running.add(current)
        emit = listener or _ignore
        deadline_at = self.scheduler.clock.now() + self.config.router.request_deadline_s
        base_seed = self._base_seed(request)
        runs = [_ImageRun(request, i, base_seed + i, deadline_at, admitted, emit)
                for i, admitted in enumerate(admission.images)]
        for run in runs:
            emit(StageProgress(run.index, "queued", position=admission.ahead + run.index))
        tasks = [asyncio.create_task(self._one_image(run)) for run in runs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            admission.release()
            self._running.discard(current)

    async def cancel_all(self) -> None:
        """Cancel every request in flight and wait until their jobs are cancelled on the workers
        (a shutdown does this before it stops the workers, which would otherwise drain the jobs)."""
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    def _base_seed(self, request: ImageRequest) -> int:
        """The request's seed, else the stage config's default, else a fresh random one, so two
        identical calls without a seed give two different images (the seeds are returned)."""
        if request.seed is not None:
            return request.seed
        default = self.config.ar.default_sampling_params.seed
        if default is not None:
            return default
        return secrets.randbelow(MAX_RANDOM_SEED - request.n + 2)

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
                                   self._config_fingerprint, request.loras)
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
            ar, ar_timings = await self._run_stage(run.stage_job(Stage.AR, ar_job), ARResult)
            if ar.size != request.size:
                raise StageFailed(f"AR stage used size {ar.size} but {request.size} was requested")
            if request.progress:
                tokens = token_layout(request.size, image_to_image=bool(request.condition_images)).tokens_to_generate
                run.emit(StageProgress(index, "ar", tokens, tokens, seconds=round(time.monotonic() - started, 4)))
            dit_started = time.monotonic()
            dit_job = DiTJob(original_prompt=original, prior_token_ids=ar.prior_token_ids,
                             prior_token_image_ids=ar.prior_token_image_ids,
                             preview_steps=preview_steps(original.num_inference_steps, request.partial_images),
                             loras=list(request.loras))
            dit, dit_timings = await self._run_stage(run.stage_job(Stage.DIT, dit_job), DiTResult)
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

    async def _run_stage(self, job: StageJob, result_type: type) -> tuple:
        """One stage job to a result of `result_type` and its timings."""
        result = await self.scheduler.run_job(job)
        if not isinstance(result.payload, result_type):
            raise StageFailed(f"{job.stage.value} worker {result.worker_id} answered with a {result.payload.stage} result")
        return result.payload, result.timings
