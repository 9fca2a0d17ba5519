"""Simulated stage workers: a TIMING MODEL in place of the model, for benchmarks only.

    .venv/bin/python -m bench.sim_workers ar  --router tcp://127.0.0.1:5570 --stage-config S.yaml \
        --tokens-per-s 91 --max-batch 32 --time-scale 20
    .venv/bin/python -m bench.sim_workers dit --router tcp://127.0.0.1:5570 --stage-config S.yaml \
        --count 8 --step-s 0.212 --time-scale 20

Never a product default and never used by correctness tests: these workers answer with grids
and images that have the right shapes and sizes but no content. What they keep real is
everything around the model: each simulated worker is a `common.worker_runtime.StageWorker`
with its own DEALER socket and worker id, so registration (with the stage-config fingerprint),
heartbeats, capacity, cancellation, deadlines, progress and previews all go through the real
runtime and the real router bus. Only `StageHandler.run` is replaced by a timing model:

- **AR** (`SimARHandler`): continuous batching on one simulated GPU. All jobs running on the
  worker share one decoder; with `b` sequences in the batch each advances at
  `tokens_per_s / (1 + growth * (b - 1))` tokens/s (a decode step costs the batch-1 step plus
  `growth` of it per extra sequence). The job writes exactly the tokens GLM-Image writes for its
  size (`common.sizes.token_layout`: 1281 for 1024x1024 text-to-image) and returns a grid of that
  size with codes in range. Capacity (the most sequences in the batch) is `--max-batch`.
- **DiT** (`SimDiTHandler`): one job at a time; sleeps `steps * step_s`, scaled by the image's
  pixels relative to 1024x1024 (linear in pixels: a simplification; attention makes the real
  cost grow a little faster), and returns a one-colour image of the requested size in the
  requested format (encoded once per size and format, then cached). `--jitter` spreads job times
  (mean kept) so a closed loop does not run in lock-step waves.

Calibration (docs/capacity.md): vLLM-Omni on one H800 reports AR ~91 tokens/s at batch 1 and DiT
10.6 s for 50 steps at 1024x1024 (step_s = 0.212). SGLang measured its batched AR at 0.039 img/s
alone and 0.137 img/s at batch 16: a 3.51x aggregate speed-up, which the step-cost model meets
with growth = 0.237 (`growth_for_speedup(3.51, 16)`).

`--time-scale F` runs every simulated duration F times faster (a 10.6 s DiT job takes 0.53 s at
F = 20), so a benchmark finishes in seconds; bench/capacity.py multiplies the measured throughput
back by 1/F. Sleeping with asyncio.sleep here *is* the timing model, not synchronisation.

One process can host many simulated workers (`--count`), each its own StageWorker, socket and
id (`<prefix>-<i>`): that is how 64 DiT workers fit on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from common.image_formats import encode_image
from common.metrics import WorkerMetrics
from common.protocol import ARResult, DiTJob, DiTResult, JobRequest, Stage, WorkerInfo
from common.sizes import ImageSize, token_layout
from common.stage_config import StageConfig, load_stage_config
from common.worker_runtime import JobProgressReporter, JobRejected, StageWorker, WorkerRefused
from stage_ar.worker import checked_ar_job

logger = logging.getLogger(__name__)

# Published GPU figures the defaults are calibrated from (docs/model_facts.md#peers).
VLLM_OMNI_AR_TOKENS_PER_S = 91.0  # H800, batch 1
VLLM_OMNI_DIT_S_50_STEPS = 10.6  # H800, 1024x1024, 50 steps
REFERENCE_PIXELS = 1024 * 1024
# Image codes 0..16383 (docs/model_facts.md#token-ids-real-model).
CODEBOOK_SIZE = 16384
SIM_MODEL_NAME = "sim-timing-model"


def growth_for_speedup(speedup: float, batch: int) -> float:
    """The per-sequence step-cost growth that gives `speedup` x the batch-1 aggregate tokens/s at `batch`."""
    if batch <= 1 or speedup <= 0:
        return 0.0
    return (batch / speedup - 1.0) / (batch - 1)


# SGLang: 0.039 img/s at batch 1, 0.137 img/s at batch 16 -> 3.51x aggregate at 16 -> growth 0.237.
SGLANG_BATCH16_SPEEDUP = 0.137 / 0.039
DEFAULT_BATCH_GROWTH = round(growth_for_speedup(SGLANG_BATCH16_SPEEDUP, 16), 4)


@dataclass(frozen=True)
class BatchingCurve:
    """Tokens/s of one sequence when `b` share the decoder: `tokens_per_s / (1 + growth * (b - 1))`.

    growth = 0 is perfect batching (every sequence at batch-1 speed); growth = 1 is none at all
    (the aggregate stays at batch-1 speed)."""

    tokens_per_s: float
    growth: float = DEFAULT_BATCH_GROWTH

    def per_stream(self, batch: int) -> float:
        return self.tokens_per_s / (1.0 + self.growth * (max(batch, 1) - 1))

    def aggregate(self, batch: int) -> float:
        return batch * self.per_stream(batch)


@dataclass
class _Sequence:
    total: float
    remaining: float
    done: asyncio.Future


class SimAREngine:
    """A fluid model of continuous batching: every running sequence advances at the per-stream
    rate of the current batch size; the rate changes whenever a sequence joins or leaves.

    Exact for the model (no time steps): between two changes of the batch it sleeps until the
    next sequence would finish, and a joining sequence wakes it to re-plan. `tokens_per_s == inf`
    (or time_scale == inf) finishes every sequence at once."""

    def __init__(self, curve: BatchingCurve, time_scale: float = 1.0):
        self.curve = curve
        self.time_scale = time_scale
        self.active: dict[str, _Sequence] = {}
        self._last = time.monotonic()
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def instant(self) -> bool:
        return self.curve.tokens_per_s == float("inf") or self.time_scale == float("inf")

    def _rate(self) -> float:
        return self.curve.per_stream(len(self.active)) * self.time_scale

    def _advance(self) -> None:
        """Account for the tokens written since the last change, at the batch size in force then."""
        now = time.monotonic()
        if self.active:
            made = (now - self._last) * self._rate()
            for seq in self.active.values():
                seq.remaining -= made
        self._last = now

    def progress(self, key: str) -> int:
        """Tokens written so far by the sequence `key` (0 when unknown)."""
        self._advance()
        seq = self.active.get(key)
        return 0 if seq is None else int(min(seq.total, max(0.0, seq.total - seq.remaining)))

    async def generate(self, key: str, tokens: int) -> None:
        """Return once `tokens` tokens of sequence `key` are written. Cancelling removes it from the batch."""
        if self.instant or tokens <= 0:
            return
        self._advance()
        seq = _Sequence(float(tokens), float(tokens), asyncio.get_running_loop().create_future())
        self.active[key] = seq
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="sim-ar-engine")
        try:
            await seq.done
        finally:
            if key in self.active:  # cancelled: leave the batch (the others speed up)
                self._advance()
                del self.active[key]
                self._changed.set()

    async def _run(self) -> None:
        while True:
            self._advance()
            for key, seq in list(self.active.items()):
                if seq.remaining <= 0.5:  # within half a token: timers fire a little early
                    del self.active[key]
                    if not seq.done.done():
                        seq.done.set_result(None)
            self._changed.clear()
            if not self.active:
                await self._changed.wait()
                continue
            wait = min(seq.remaining for seq in self.active.values()) / self._rate()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=max(wait, 0.0))
            except asyncio.TimeoutError:
                pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _size_of_png(data: bytes) -> ImageSize:
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return ImageSize(width=image.width, height=image.height)
    except Exception as exc:
        raise JobRejected(f"condition image is not a decodable image: {exc}") from exc


class SimARHandler:
    """AR stage timing model (see the module docstring); implements StageHandler."""

    def __init__(self, engine: SimAREngine, metrics: WorkerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics

    async def close(self) -> None:
        await self.engine.close()

    async def run(self, job: JobRequest, progress: JobProgressReporter) -> tuple[ARResult, dict[str, float]]:
        ar, size = checked_ar_job(job)
        condition_sizes = [_size_of_png(b) for b in ar.prompt.images]
        total = token_layout(size, image_to_image=bool(condition_sizes)).tokens_to_generate
        started = time.monotonic()
        reporter = None
        if progress.wants_steps and not self.engine.instant:
            reporter = asyncio.create_task(self._report(job.job_id, total, progress))
        try:
            await self.engine.generate(job.job_id, total)
        finally:
            if reporter is not None:
                reporter.cancel()
        if progress.wants_steps:
            progress.steps(total, total)
        elapsed = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.tokens.inc(total)
        rng = np.random.default_rng(ar.sampling.seed)

        def grid(s: ImageSize) -> np.ndarray:
            return rng.integers(0, CODEBOOK_SIZE, size=(s.grid.rows, s.grid.cols), dtype=np.int64)

        result = ARResult(prior_token_ids=grid(size), prior_token_image_ids=[grid(s) for s in condition_sizes],
                          height=size.height, width=size.width)
        return result, {"ar_s": elapsed}

    async def _report(self, key: str, total: int, progress: JobProgressReporter) -> None:
        while True:
            await asyncio.sleep(progress.min_interval_s)
            progress.steps(self.engine.progress(key), total)


@lru_cache(maxsize=64)
def _flat_image(width: int, height: int, output_format: str, noise: bool) -> bytes:
    """A valid image of the size, encoded once: one colour (a few KB), or noise (worst-case size)."""
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGB")
    else:
        image = Image.new("RGB", (width, height), (96, 128, 160))
    return encode_image(image, output_format)  # type: ignore[arg-type]


class SimDiTHandler:
    """DiT stage timing model (see the module docstring); implements StageHandler."""

    def __init__(self, step_s: float, time_scale: float = 1.0, noise_image: bool = False, jitter: float = 0.0):
        self.step_s = step_s
        self.time_scale = time_scale
        self.noise_image = noise_image
        self.jitter = jitter
        self._rng = random.Random()

    def job_seconds(self, size: ImageSize, steps: int) -> float:
        """Wall time of one job under the timing model, after the time scale (mean, without jitter)."""
        return steps * self.step_s * (size.width * size.height / REFERENCE_PIXELS) / self.time_scale

    async def run(self, job: JobRequest, progress: JobProgressReporter) -> tuple[DiTResult, dict[str, float]]:
        dit = job.payload
        if not isinstance(dit, DiTJob):
            raise JobRejected(f"DiT worker got a {dit.stage} job")
        original = dit.original_prompt
        size = original.size
        expected = size.grid
        if tuple(dit.prior_token_ids.shape) != (expected.rows, expected.cols):
            raise JobRejected(f"prior grid {tuple(dit.prior_token_ids.shape)} does not fit size {size}")
        steps = original.num_inference_steps
        started = time.monotonic()
        image = _flat_image(size.width, size.height, original.output_format, self.noise_image)
        total_s = self.job_seconds(size, steps)
        if self.jitter:
            # Mean-preserving noise: exact equal job times keep a closed loop in lock-step waves.
            total_s *= self._rng.uniform(1 - self.jitter, 1 + self.jitter)
        if progress.wants_steps or dit.preview_steps:
            # Step by step only when someone watches: one sleep per step for 64 workers costs CPU.
            previews = set(dit.preview_steps)
            for step in range(steps):
                if total_s > 0:
                    await asyncio.sleep(total_s / steps)
                progress.steps(step + 1, steps)
                if step in previews:
                    progress.preview(sorted(previews).index(step), image, step + 1, steps)
        elif total_s > 0:
            await asyncio.sleep(total_s)
        result = DiTResult(image=image, output_format=original.output_format, height=size.height, width=size.width)
        return result, {"dit_s": time.monotonic() - started}


# ---------------------------------------------------------------------------
# Processes hosting simulated workers.


def make_workers(stage: Stage, config: StageConfig, routers: list[str], count: int, id_prefix: str,
                 make_handler, capacity: int) -> list[StageWorker]:
    """`count` StageWorkers named `<id_prefix>-<i>`, each with its own handler and DEALER socket."""
    workers = []
    for i in range(count):
        worker_id = f"{id_prefix}-{i}"
        metrics = WorkerMetrics(stage.value, worker_id)
        info = WorkerInfo(worker_id=worker_id, stage=stage, model=SIM_MODEL_NAME, capacity=capacity, pid=os.getpid(),
                          host=socket.gethostname(), config_fingerprint=config.fingerprint())
        workers.append(StageWorker(info, routers, make_handler(metrics), config.bus, metrics))
    return workers


async def serve_workers(workers: list[StageWorker], drain_grace_s: float = 5.0) -> None:
    """Serve every worker until SIGINT/SIGTERM, then drain them all (a second signal stops at once)."""
    loop = asyncio.get_running_loop()
    draining: list[asyncio.Task] = []

    def on_signal() -> None:
        if draining:
            for w in workers:
                w.stop()
            return
        draining.extend(asyncio.create_task(w.drain(drain_grace_s)) for w in workers)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        await asyncio.gather(*(w.serve() for w in workers))
    finally:
        for task in draining:
            task.cancel()
        for w in workers:
            close = getattr(w.handler, "close", None)
            if close is not None:
                await close()


def _number_or_inf(text: str) -> float:
    return float("inf") if text in ("inf", "instant") else float(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sim_workers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["ar", "dit"])
    parser.add_argument("--router", action="append", required=True, metavar="ADDR", help="router bus address (repeatable)")
    parser.add_argument("--stage-config", required=True, help="the router's stage config (its fingerprint must match)")
    parser.add_argument("--count", type=int, default=1, help="simulated workers hosted by this process (default: 1)")
    parser.add_argument("--id-prefix", help="worker ids are PREFIX-0, PREFIX-1, ... (default: sim-STAGE-PID)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="run every simulated duration this many times faster (default: 1 = real GPU time)")
    ar = parser.add_argument_group("AR timing model")
    ar.add_argument("--tokens-per-s", type=_number_or_inf, default=VLLM_OMNI_AR_TOKENS_PER_S,
                    help="batch-1 decode speed, 'inf' for instant (default: %(default)s, vLLM-Omni on an H800)")
    ar.add_argument("--batch-growth", type=float, default=DEFAULT_BATCH_GROWTH,
                    help="step-cost growth per extra sequence (default: %(default)s, SGLang's 3.51x at batch 16)")
    ar.add_argument("--max-batch", type=int, default=32, help="sequences per AR worker = its capacity (default: %(default)s)")
    dit = parser.add_argument_group("DiT timing model")
    dit.add_argument("--step-s", type=float, default=VLLM_OMNI_DIT_S_50_STEPS / 50,
                     help="seconds per denoising step at 1024x1024, 0 for instant (default: %(default)s)")
    dit.add_argument("--jitter", type=float, default=0.0,
                     help="spread each job's time uniformly by +-this fraction, mean kept (default: 0, exact)")
    dit.add_argument("--noise-image", action="store_true",
                     help="return an incompressible noise image (worst-case payload) instead of one colour")
    parser.add_argument("--log-level", default=os.environ.get("GLM_SERVE_LOG_LEVEL", "WARNING"),
                        help="log level (default: WARNING: per-job INFO lines cost CPU the benchmark wants)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point: host `--count` simulated workers of one stage until SIGTERM."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s sim-{args.stage}[%(process)d] %(name)s: %(message)s")
    config = load_stage_config(args.stage_config)
    stage = Stage(args.stage)
    prefix = args.id_prefix or f"sim-{args.stage}-{os.getpid()}"

    async def run() -> None:
        if stage == Stage.AR:
            curve = BatchingCurve(args.tokens_per_s, args.batch_growth)
            workers = make_workers(stage, config, args.router, args.count, prefix,
                                   lambda m: SimARHandler(SimAREngine(curve, args.time_scale), m), args.max_batch)
        else:
            workers = make_workers(stage, config, args.router, args.count, prefix,
                                   lambda m: SimDiTHandler(args.step_s, args.time_scale, args.noise_image, args.jitter), 1)
        logger.warning("%d simulated %s worker(s) %s-0..%d (timing model, not a model) serving %s",
                       args.count, stage.value, prefix, args.count - 1, args.router)
        await serve_workers(workers)

    import uvloop

    try:
        uvloop.run(run())
    except WorkerRefused as exc:
        sys.exit(f"error: the router refused these workers: {exc}")


if __name__ == "__main__":
    main()
