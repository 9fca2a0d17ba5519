"""The router's scheduler: per stage, the waiting line, slot accounting, worker choice, retries,
deadlines, and admission of new requests. docs/scheduling.md explains the model.

Several routers share one pool of workers and none sees the others' jobs, so the worker arbitrates
its own slots (common/worker_runtime.py): a job beyond its capacity is refused as OVERLOADED and the
router is queued there for a SlotOffer. Here such a refusal is back-pressure: the job goes back to
its place in the line and the worker is left alone until it offers a slot (or a heartbeat shows free
slots, or `2 x heartbeat_interval_s` pass), never an error for the client. A job fails only when no
live worker of its stage shows up within `no_worker_grace_s`, its deadline passes, or real failures
(a worker lost, an internal error) exceed `max_retries`.

The waiting line is ordered by service tier (OpenAI's `service_tier`: priority, default, flex), a
tier rising one step per `priority_aging_s` waited so none starves; within a tier, the tenant (API
key) served longest ago goes first, so one key's thousand queued images do not hold up another's one;
then first come, first served.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

from common.protocol import ErrorCode, JobError, JobPayload, JobProgress, JobRequest, JobResult, Stage
from common.stage_config import StageConfig
from router.core.clock import Clock, MonotonicClock
from router.core.errors import (
    DeadlineExceeded,
    InvalidRequest,
    NoLiveWorkers,
    Overloaded,
    StageFailed,
    TenantOverLimit,
)
from router.core.image_request import SERVICE_TIERS, ImageRequest, ServiceTier
from router.core.metrics import RouterMetrics, StageSnapshot
from router.core.worker_pool import LOSS_REASONS, WorkerPool, WorkerState

logger = logging.getLogger(__name__)

# A waiting job re-checks worker liveness and its deadline at least this often.
_RECHECK_S = 0.5
# Weight of the newest job in a stage's running average of job time (for wait estimates).
_SERVICE_EMA = 0.3


class WorkerLost(Exception):
    """The worker running a job died or left before answering."""


class JobTransport(Protocol):
    """What the scheduler needs from the bus (router/core/bus.py; a fake one in the tests)."""

    async def submit(self, worker: WorkerState, job: JobRequest,
                     on_progress: Callable[[JobProgress], None] | None) -> asyncio.Future:
        """Send `job` to `worker`; the future resolves to its JobResult or JobError, or fails with WorkerLost."""
        ...

    async def cancel(self, job_id: str) -> None:
        """Tell the worker to stop the job; its future is cancelled."""
        ...

    def decline_offer(self, worker: WorkerState) -> None:
        """Tell the worker this router has no job for the slot it offered."""
        ...


class _Retryable(Exception):
    """One attempt failed in a way another attempt (on another worker) may fix."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # the metrics label: worker_lost, overloaded, internal, cancelled
        self.message = message


@dataclass(eq=False)
class AdmittedImage:
    """One image between admission and its end: which stages it still needs (for wait estimates)."""

    tier: ServiceTier
    tenant: str
    stages_left: set[Stage] = field(default_factory=lambda: set(Stage))


@dataclass(eq=False)
class Admission:
    """The images of one admitted request; `release()` (always, when the request ends) frees them."""

    images: list[AdmittedImage]
    ahead: int  # images admitted before these that still need the AR stage
    _release: Callable[["Admission"], None]

    def release(self) -> None:
        self._release(self)


@dataclass(frozen=True)
class StageJob:
    """One stage of one image, as the orchestrator hands it over."""

    stage: Stage
    request: ImageRequest
    image: AdmittedImage
    image_index: int
    payload: JobPayload
    deadline_at: float
    on_progress: Callable[[JobProgress], None] | None = None
    on_retry: Callable[[str], None] | None = None  # told the reason when an attempt is re-dispatched


@dataclass(eq=False)
class _Ticket:
    job: StageJob
    seq: int
    enqueued_at: float
    granted: asyncio.Future
    attempt: int = 0
    job_id: str = ""
    granted_at: float = 0.0
    no_worker_since: float | None = None


def _loras_of(job: StageJob) -> frozenset[str]:
    """The sha256 digests of a DiT job's LoRA adapters (none for other jobs)."""
    return frozenset(spec.digest for spec in getattr(job.payload, "loras", ()))


class Scheduler:
    """Owns every scheduling decision of one router (see the module docstring).

    The bus reports what happens on the wire (`workers_changed`, `slot_offered`); the orchestrator
    asks for admission (`admit`) and runs stage jobs (`run_job`)."""

    def __init__(self, config: StageConfig, pool: WorkerPool, transport: JobTransport, metrics: RouterMetrics,
                 clock: Clock | None = None):
        self.config = config
        self.settings = config.router
        self.pool = pool
        self.transport = transport
        self.metrics = metrics
        self.clock = clock or MonotonicClock()
        self._lines: dict[Stage, list[_Ticket]] = {stage: [] for stage in Stage}
        self._seq = itertools.count()
        self._picks = itertools.count(1)
        # Per stage, tenant -> a serve counter value: the tenant served longest ago goes first.
        self._tenant_served: dict[Stage, dict[str, int]] = {stage: {} for stage in Stage}
        self._served = itertools.count(1)
        # Per stage, a running average of job time (dispatch to result); None until one finished.
        self.service_s: dict[Stage, float | None] = {stage: None for stage in Stage}
        # ... and of how far job times stray from it (as TCP tracks round-trip times): admission plans
        # with mean + 2 deviations, so a request admitted at the edge of its deadline still makes it.
        self.service_dev_s: dict[Stage, float] = {stage: 0.0 for stage in Stage}
        self._admitted: list[AdmittedImage] = []
        self._tenant_images: dict[str, int] = {}
        self._refusal_backoff_s = 2 * config.bus.heartbeat_interval_s

    # -- what the bus reports ------------------------------------------------------------------

    def workers_changed(self) -> None:
        """A worker joined, left, or heartbeated (its free slots may have changed): dispatch."""
        for stage in Stage:
            self._dispatch(stage)

    def slot_offered(self, worker_id: str) -> None:
        """`worker_id` holds a freed slot for this router: fill it from the line, or decline it."""
        worker = self.pool.workers.get(worker_id)
        if worker is None:
            return
        worker.refused_at, worker.offered = None, True
        self._dispatch(worker.info.stage)
        if worker.offered:  # nothing waiting: let the worker offer it to the next router
            worker.offered = False
            self.transport.decline_offer(worker)

    # -- admission -----------------------------------------------------------------------------

    def admit(self, request: ImageRequest) -> Admission:
        """Admit the request's images, or raise Overloaded (429 with Retry-After) when its tenant is
        at its cap, a stage's waiting line would pass `queue_limit_per_stage`, or the estimated wait
        would pass `max_queue_wait_s` or the request deadline."""
        tier, tenant, n = request.service_tier, request.tenant, request.n
        cap = request.tenant_max_images
        in_flight = self._tenant_images.get(tenant, 0)
        if cap is not None and in_flight + n > cap:
            self.metrics.rejected.labels(reason="tenant_cap", tier=tier).inc()
            raise TenantOverLimit(
                f"this API key ({tenant}) already has {in_flight} image(s) in flight and may have at most {cap}; "
                f"wait for some to finish (or ask for fewer than n={n})", retry_after_s=self._retry_after(tier, n))
        self._check_lines(tier, n)
        self._check_wait(tier, n)
        ahead = sum(1 for image in self._admitted if Stage.AR in image.stages_left)
        images = [AdmittedImage(tier, tenant) for _ in range(n)]
        self._admitted.extend(images)
        self._tenant_images[tenant] = in_flight + n
        self.metrics.admitted_images.labels(tier=tier, tenant=tenant).inc(n)
        self.metrics.pending_images.set(len(self._admitted))
        return Admission(images, ahead, self._release)

    def _release(self, admission: Admission) -> None:
        for image in admission.images:
            self._admitted.remove(image)
        tenant = admission.images[0].tenant
        left = self._tenant_images.get(tenant, 0) - len(admission.images)
        if left > 0:
            self._tenant_images[tenant] = left
        else:
            self._tenant_images.pop(tenant, None)
        self.metrics.pending_images.set(len(self._admitted))

    def _check_lines(self, tier: ServiceTier, n: int) -> None:
        """Each stage's line: the images that still need it beyond its live slots stay within the bound."""
        limit = self.settings.queue_limit_per_stage
        for stage in Stage:
            capacity = self.pool.capacity(stage)
            if not capacity:
                continue  # no worker yet: waiting jobs get 503 after no_worker_grace_s
            waiting = self._needing(stage) + self._others_running(stage) - capacity
            if waiting + n > limit:
                self.metrics.rejected.labels(reason="queue_full", tier=tier).inc()
                raise Overloaded(
                    f"server is at capacity: {max(waiting, 0)} image(s) wait for the {stage.value} stage "
                    f"({capacity} slot(s)), limit {limit}; retry later", retry_after_s=self._retry_after(tier, n))

    def _check_wait(self, tier: ServiceTier, n: int) -> None:
        max_wait = self.settings.max_queue_wait_s
        if max_wait is not None:
            # A fresh fleet: nothing says how long a job takes yet. Until the first job time is
            # known, admit what the slots can start now plus one more round (a wait of one job).
            for stage in Stage:
                capacity = self.pool.capacity(stage)
                if capacity and self.service_time(stage) is None and (
                        self._needing(stage) + self._others_running(stage) + n > 2 * capacity):
                    self.metrics.rejected.labels(reason="wait", tier=tier).inc()
                    raise Overloaded(
                        f"server is warming up: its {capacity} {stage.value} slot(s) and one round of waiting are "
                        f"taken, and no {stage.value} job has finished yet to promise a wait within "
                        f"{max_wait:.0f}s; retry shortly", retry_after_s=1.0)
        wait_s = self.estimated_wait_s(tier, n)
        if wait_s is None:
            return
        service = sum(t for t in map(self.service_time, Stage) if t is not None)
        allowed = self.settings.request_deadline_s - service
        if self.settings.max_queue_wait_s is not None:
            allowed = min(allowed, self.settings.max_queue_wait_s)
        if wait_s > allowed:
            self.metrics.rejected.labels(reason="wait", tier=tier).inc()
            raise Overloaded(
                f"server is at capacity: a new {tier}-tier request would wait about {wait_s:.0f}s for worker slots "
                f"(allowed {max(allowed, 0):.0f}s); retry later", retry_after_s=max(1.0, wait_s - allowed))

    def estimated_wait_s(self, tier: ServiceTier, n: int = 1) -> float | None:
        """Seconds the last of `n` new images of `tier` would wait for slots, all stages together;
        None before any job time is known.

        A small simulation of the pipeline: each stage is its live slots serving jobs of its recent
        job time. Its slots start busy with the jobs running now (this router's and, from their
        heartbeats, other routers'), each expected half done. The work ahead (this router's images
        of the same or a higher tier) then runs in order: images still in the AR stage reach the
        DiT only when their AR job ends, so an idle DiT does not count as clearing them, and a DiT
        backlog that clears while the new images are in the AR stage costs them nothing."""
        rank = SERVICE_TIERS.index(tier)
        ahead = [image for image in self._admitted if SERVICE_TIERS.index(image.tier) <= rank]
        known = False
        # When each image ahead that still needs the AR reaches the DiT; then the new images.
        dit_ready: list[float] = [0.0] * sum(1 for image in ahead if Stage.AR in image.stages_left)
        mine: list[float] = [0.0] * n
        service_total = 0.0
        for stage in Stage:
            service, capacity = self.service_time(stage), self.pool.capacity(stage)
            if service is None or not capacity:
                continue
            known = True
            service_total += service
            own_running = sum(len(w.assigned) for w in self.pool.live(stage))
            busy = min(capacity, own_running + self._others_running(stage))
            slots = [service / 2] * busy + [0.0] * (capacity - busy)
            if stage == Stage.AR:
                queued = sorted(dit_ready)
                running = min(own_running, len(queued))
                # Running AR jobs reach the DiT when they end; the others start when a slot frees.
                dit_ready = [service / 2] * running + self._serve(slots, queued[running:], service)
            else:
                waiting_for_dit = sum(1 for image in ahead if image.stages_left == {Stage.DIT})
                queued = [0.0] * max(0, waiting_for_dit - own_running) + dit_ready
                self._serve(slots, sorted(queued), service)
            mine = self._serve(slots, mine, service)
        return max(mine) - service_total if known else None

    @staticmethod
    def _serve(slots: list[float], ready_at: list[float], service: float) -> list[float]:
        """Jobs ready at `ready_at` (in order) on slots free at `slots` (a heap, updated): their end times."""
        heapq.heapify(slots)
        ends = []
        for ready in ready_at:
            end = max(heapq.heappop(slots), ready) + service
            heapq.heappush(slots, end)
            ends.append(end)
        return ends

    def service_time(self, stage: Stage) -> float | None:
        """A stage's job time as admission plans with it: this router's running average plus twice
        the running deviation, else what its live workers report."""
        if self.service_s[stage] is not None:
            return self.service_s[stage] + 2 * self.service_dev_s[stage]
        reported = [w.job_seconds for w in self.pool.live(stage) if w.job_seconds is not None]
        return sum(reported) / len(reported) if reported else None

    def _retry_after(self, tier: ServiceTier, n: int) -> float:
        """When to come back: about the time for the work ahead to drain; at least 1 s."""
        wait = self.estimated_wait_s(tier, n)
        return 1.0 if wait is None else max(1.0, math.ceil(wait / 2))

    def _needing(self, stage: Stage, max_rank: int = len(SERVICE_TIERS)) -> int:
        return sum(1 for image in self._admitted
                   if stage in image.stages_left and SERVICE_TIERS.index(image.tier) <= max_rank)

    def _others_running(self, stage: Stage) -> int:
        """Jobs other routers run on the stage's live workers (their heartbeats say how many run)."""
        return sum(w.running_elsewhere for w in self.pool.live(stage))

    # -- stage jobs ----------------------------------------------------------------------------

    async def run_job(self, job: StageJob) -> JobResult:
        """Run one stage job to its result: wait in line for a slot, dispatch, re-dispatch on
        back-pressure and on failures another worker may fix. Raises ServiceErrors."""
        stage = job.stage
        now = self.clock.now()
        ticket = _Ticket(job, next(self._seq), now, asyncio.get_running_loop().create_future())
        failures = 0
        while True:
            worker = await self._wait_for_slot(ticket)
            try:
                result = await self._attempt(worker, ticket)
            except _Retryable as retry:
                self.metrics.job_retries.labels(stage=stage.value, reason=retry.reason).inc()
                if retry.reason == ErrorCode.OVERLOADED.value:
                    continue  # back-pressure: back to its place in the line, not a failure
                failures += 1
                logger.warning("[%s] %s stage: %s; re-dispatching (%d/%d)", job.request.log_tag, stage.value,
                               retry.message, failures, self.settings.max_retries)
                if failures > self.settings.max_retries:
                    raise StageFailed(f"{stage.value} stage failed after {failures} attempt(s): {retry.message}") from None
                if job.on_retry is not None:
                    job.on_retry(retry.reason)
                continue
            elapsed = self.clock.now() - ticket.granted_at
            previous = self.service_s[stage]
            if previous is None:
                self.service_s[stage] = elapsed
            else:
                self.service_dev_s[stage] += _SERVICE_EMA * (abs(elapsed - previous) - self.service_dev_s[stage])
                self.service_s[stage] = previous + _SERVICE_EMA * (elapsed - previous)
            self.metrics.job_seconds.labels(stage=stage.value).observe(self.clock.now() - ticket.enqueued_at)
            job.image.stages_left.discard(stage)
            return result

    async def _wait_for_slot(self, ticket: _Ticket) -> WorkerState:
        """Queue the ticket and wait for `_dispatch` to grant it a worker slot."""
        stage, line = ticket.job.stage, self._lines[ticket.job.stage]
        ticket.granted = asyncio.get_running_loop().create_future()
        line.append(ticket)
        self._dispatch(stage)
        try:
            while not ticket.granted.done():
                timeout = self._check_waiting(ticket)
                await self.clock.wait(ticket.granted, timeout)
            worker = ticket.granted.result()
        except BaseException:
            if ticket in line:
                line.remove(ticket)
            elif ticket.granted.done() and not ticket.granted.cancelled():
                self._free_slot(ticket.granted.result(), ticket.job_id)  # granted as we were cancelled
            raise
        self.metrics.queue_wait.labels(stage=stage.value, tier=ticket.job.request.service_tier).observe(
            ticket.granted_at - ticket.enqueued_at)
        return worker

    def _check_waiting(self, ticket: _Ticket) -> float:
        """Raise when waiting must end (no live worker past the grace time, deadline passed); else
        return how long to wait before checking again."""
        stage, now = ticket.job.stage, self.clock.now()
        grace = self.settings.no_worker_grace_s
        remaining = ticket.job.deadline_at - now
        if remaining <= 0:
            raise DeadlineExceeded(f"request deadline passed while waiting for a free {stage.value} worker")
        if self.pool.live(stage):
            ticket.no_worker_since = None
            return min(_RECHECK_S, remaining)
        ticket.no_worker_since = ticket.no_worker_since if ticket.no_worker_since is not None else now
        left = ticket.no_worker_since + grace - now
        if left <= 0:
            raise NoLiveWorkers(f"no live {stage.value} worker is registered; start one or retry later", retry_after_s=5)
        return min(_RECHECK_S, remaining, left)

    def _dispatch(self, stage: Stage) -> None:
        """Grant free slots to the waiting jobs of `stage`, best first (see `_order`)."""
        line = self._lines[stage]
        while line:
            ticket = min(line, key=self._order(stage))
            worker = self._pick(stage, _loras_of(ticket.job))
            if worker is None:
                return
            line.remove(ticket)
            ticket.job_id = f"{ticket.job.request.request_id}.{ticket.job.image_index}.{stage.value}.{ticket.attempt}"
            ticket.attempt += 1
            ticket.granted_at = self.clock.now()
            worker.assigned.add(ticket.job_id)
            worker.offered = False
            worker.last_picked = next(self._picks)
            # The worker loads the job's adapters: later jobs for them go there too (before its next heartbeat says so).
            worker.loaded_loras |= _loras_of(ticket.job)
            self._tenant_served[stage][ticket.job.request.tenant] = next(self._served)
            ticket.granted.set_result(worker)

    def _order(self, stage: Stage) -> Callable[[_Ticket], tuple]:
        """Waiting jobs, best first: effective tier (aged), tenant served longest ago, arrival."""
        now, aging = self.clock.now(), self.settings.priority_aging_s
        served = self._tenant_served[stage]

        def key(ticket: _Ticket) -> tuple:
            rank = SERVICE_TIERS.index(ticket.job.request.service_tier)
            aged = max(0, rank - int((now - ticket.enqueued_at) // aging))
            return aged, served.get(ticket.job.request.tenant, 0), ticket.seq

        return key

    def _pick(self, stage: Stage, loras: frozenset[str] = frozenset()) -> WorkerState | None:
        """A live worker of the stage with a slot free to this router: one that has the job's LoRA
        adapters loaded first (any free worker otherwise: it loads them, so an adapter never waits for
        one busy worker), then one holding an offer for us, then the least loaded, then the one picked
        longest ago (so a new replica takes work at once and other routers' jobs, which we cannot see,
        spread too)."""
        now = self.clock.now()
        candidates = []
        for w in self.pool.live(stage):
            if len(w.assigned) >= w.info.capacity:
                continue
            if w.refused_at is not None:
                # The worker said it is full and queued us for an offer; until then, or until a heartbeat
                # shows a free slot, or the back-off passes (a lost offer must not strand us), leave it be.
                if w.reported_free > 0 or now - w.refused_at >= self._refusal_backoff_s:
                    w.refused_at = None
                else:
                    continue
            candidates.append(w)
        return min(candidates, key=lambda w: (not loras <= w.loaded_loras, not w.offered, w.load, len(w.assigned),
                                              w.last_picked, w.info.worker_id), default=None)

    def _free_slot(self, worker: WorkerState, job_id: str) -> None:
        worker.assigned.discard(job_id)
        self._dispatch(worker.info.stage)

    async def _attempt(self, worker: WorkerState, ticket: _Ticket) -> JobResult:
        """Send the granted ticket's job to `worker` and wait for the reply. Returns the result;
        raises `_Retryable` when another attempt may succeed, a ServiceError when none can."""
        job, job_id = ticket.job, ticket.job_id
        request, stage = job.request, job.stage
        try:
            remaining = job.deadline_at - self.clock.now()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"request exceeded its {self.settings.request_deadline_s:.0f}s deadline in the {stage.value} stage")
            timeout = min(self.config.stage(stage).timeouts.job_deadline_s, remaining)
            message = JobRequest(job_id=job_id, request_id=request.request_id, client_request_id=request.client_request_id,
                                 deadline_s=timeout, payload=job.payload, progress=request.progress)
            future = await self.transport.submit(worker, message, job.on_progress)
            try:
                # The worker enforces the deadline itself; the margin covers a worker that can't.
                answered = await self.clock.wait(future, timeout + 2 * self.config.bus.peer_timeout_s)
            except asyncio.CancelledError:
                logger.info("[%s] cancelling %s job %s on %s", request.log_tag, stage.value, job_id, worker.info.worker_id)
                await self.transport.cancel(job_id)
                raise
            if not answered:
                await self.transport.cancel(job_id)
                raise DeadlineExceeded(f"{stage.value} stage did not answer within {timeout:.0f}s")
        finally:
            self._free_slot(worker, job_id)
        if future.cancelled():
            raise _Retryable("cancelled", f"job {job_id} on {worker.info.worker_id} was cancelled")
        if isinstance(future.exception(), WorkerLost):
            raise _Retryable("worker_lost", str(future.exception()))
        reply = future.result()
        if isinstance(reply, JobResult):
            return reply
        raise self._classify(stage, worker, reply)

    def _classify(self, stage: Stage, worker: WorkerState, reply: JobError) -> Exception:
        """What a worker's error reply means: final (a ServiceError) or retryable."""
        if reply.code == ErrorCode.BAD_REQUEST:
            return InvalidRequest(f"{stage.value} stage rejected the request: {reply.message}")
        if reply.code == ErrorCode.TIMEOUT:
            return DeadlineExceeded(reply.message)
        if reply.code == ErrorCode.OVERLOADED:
            # Its last heartbeat's free slots are stale now; the next heartbeat (or an offer) tells anew.
            worker.refused_at, worker.reported_free = self.clock.now(), 0
        return _Retryable(reply.code.value, f"worker {reply.worker_id}: {reply.message}")

    # -- what the metrics read -----------------------------------------------------------------

    def stage_snapshots(self) -> dict[Stage, StageSnapshot]:
        """Per stage: workers, slots in use and free, jobs waiting for a slot, churn (the autoscaling metrics)."""
        pool = self.pool
        return {
            stage: StageSnapshot(
                live_workers=len(pool.live(stage)),
                slots=pool.capacity(stage),
                busy_slots=sum(len(w.assigned) for w in pool.workers.values() if w.info.stage == stage),
                queued_jobs=len(self._lines[stage]),
                registrations=pool.registrations[stage],
                losses={reason: pool.losses[stage, reason] for reason in LOSS_REASONS},
            )
            for stage in Stage
        }

