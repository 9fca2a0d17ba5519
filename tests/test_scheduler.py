"""The Scheduler in-process: a fake transport and a fake clock, several routers sharing workers.

Each "router" here is a real Scheduler with its own worker table; the workers they share are
driven by the real SlotArbiter (the code the worker runtime runs), and the tests decide when a job
finishes and how time passes. Through real processes the same properties are checked in
tests/test_multi_router.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from common.protocol import ARJob, ARPrompt, ARResult, ARSampling, ErrorCode, Heartbeat, JobError, JobRequest, JobResult
from common.protocol import DiTJob, LoraSpec, MMProcessorKwargs, OriginalPrompt, Stage, WorkerInfo
from common.sizes import ImageSize
from common.slot_arbiter import SlotArbiter
from common.stage_config import StageConfig
from harness.local_cluster import merge_stage_overrides
from router.core.errors import DeadlineExceeded, NoLiveWorkers, Overloaded, StageFailed, TenantOverLimit
from router.core.image_request import ImageRequest
from router.core.metrics import RouterMetrics
from router.core.scheduler import Scheduler, StageJob, WorkerLost
from router.core.worker_pool import WorkerPool

pytestmark = [pytest.mark.quick, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"

SIZE = ImageSize(width=256, height=256)


class FakeClock:
    """Time moves only when the test says; waits whose time has come are woken in order."""

    def __init__(self) -> None:
        self.t = 0.0
        self._timers: list[tuple[float, asyncio.Future]] = []

    def now(self) -> float:
        return self.t

    async def wait(self, future: asyncio.Future, timeout: float) -> bool:
        if future.done() or timeout <= 0:
            return future.done()
        timer = asyncio.get_running_loop().create_future()
        entry = (self.t + timeout, timer)
        self._timers.append(entry)
        try:
            await asyncio.wait({future, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._timers.remove(entry)
        return future.done()

    async def advance(self, seconds: float) -> None:
        end = self.t + seconds
        while True:
            await settle()
            due = [entry for entry in self._timers if entry[0] <= end and not entry[1].done()]
            if not due:
                break
            self.t = max(self.t, min(at for at, _ in due))
            for at, timer in due:
                if at <= self.t:
                    timer.set_result(None)
        self.t = end
        await settle()


async def settle() -> None:
    """Let every ready task run until none has anything left to do right now."""
    for _ in range(30):
        await asyncio.sleep(0)


@dataclass
class SharedWorker:
    """A worker several routers share: the real SlotArbiter decides who runs; the test finishes jobs."""

    worker_id: str
    stage: Stage
    capacity: int
    routers: dict[str, Scheduler] = field(default_factory=dict)
    running: dict[str, tuple[str, asyncio.Future]] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)  # job ids, in the order they finished
    max_running: int = 0
    refusals: int = 0

    def __post_init__(self) -> None:
        self.slots: SlotArbiter[str] = SlotArbiter(self.capacity)
        self.info = WorkerInfo(worker_id=self.worker_id, stage=self.stage, model="m", capacity=self.capacity, pid=1,
                               host="h", config_fingerprint="f")

    def receive(self, router: str, job: JobRequest, future: asyncio.Future) -> None:
        if self.slots.try_start(router):
            self.running[job.job_id] = (router, future)
            self.max_running = max(self.max_running, len(self.running))
        else:
            self.refusals += 1
            future.set_result(JobError(job_id=job.job_id, worker_id=self.worker_id, code=ErrorCode.OVERLOADED,
                                       message="worker at capacity"))
        self.offer()

    def finish(self, job_id: str | None = None, reply: str = "ok") -> str:
        """End a running job (the oldest by default) with a result, or an error code."""
        job_id = job_id or next(iter(self.running))
        _router, future = self.running.pop(job_id)
        self.slots.finish()
        self.finished.append(job_id)
        if reply == "ok":
            payload = ARResult(height=SIZE.height, width=SIZE.width, prior_token_ids=np.zeros((2, 2), dtype=np.int64))
            future.set_result(JobResult(job_id=job_id, worker_id=self.worker_id, payload=payload))
        elif reply == "lost":
            future.set_exception(WorkerLost(f"worker {self.worker_id} died while running the job"))
        else:
            future.set_result(JobError(job_id=job_id, worker_id=self.worker_id, code=ErrorCode(reply), message=reply))
        self.offer()
        return job_id

    def cancel(self, job_id: str) -> bool:
        if job_id not in self.running:
            return False
        _router, future = self.running.pop(job_id)
        self.slots.finish()
        future.cancel()
        self.offer()
        return True

    def decline(self, router: str) -> None:
        self.slots.release(router)
        self.offer()

    def offer(self) -> None:
        for router in self.slots.next_offers():
            self.routers[router].slot_offered(self.worker_id)

    def heartbeat(self, router: str) -> Heartbeat:
        elsewhere = sum(1 for owner, _ in self.running.values() if owner != router)
        return Heartbeat(info=self.info, running_elsewhere=elsewhere, free_slots=self.slots.free_for(router))


class FakeTransport:
    """The bus as the Scheduler sees it, delivering to SharedWorkers in the same process."""

    def __init__(self, name: str, workers: dict[str, SharedWorker]):
        self.name, self.workers = name, workers
        self.cancelled: list[str] = []

    async def submit(self, worker, job, on_progress):
        future = asyncio.get_running_loop().create_future()
        self.workers[worker.info.worker_id].receive(self.name, job, future)
        return future

    async def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        for worker in self.workers.values():
            worker.cancel(job_id)

    def decline_offer(self, worker) -> None:
        self.workers[worker.info.worker_id].decline(self.name)


def stage_config(**router) -> StageConfig:
    base = {"router": {"request_deadline_s": 600, "max_retries": 2, "queue_limit_per_stage": 100,
                       "no_worker_grace_s": 5, **router},
            "bus": {"heartbeat_interval_s": 1.0, "peer_timeout_s": 5.0},
            "stage_args": [{"stage_id": 0, "stage_type": "ar"}, {"stage_id": 1, "stage_type": "dit"}]}
    return StageConfig.model_validate(merge_stage_overrides(base, {}))


class Fleet:
    """Routers (Schedulers) and the workers they share, on one fake clock."""

    def __init__(self, config: StageConfig, workers: list[SharedWorker], routers: int = 1):
        self.config, self.clock = config, FakeClock()
        self.workers = {w.worker_id: w for w in workers}
        self.routers: list[Scheduler] = []
        for index in range(routers):
            name = f"r{index}"
            pool = WorkerPool(config.bus.peer_timeout_s)
            scheduler = Scheduler(config, pool, FakeTransport(name, self.workers),
                                  RouterMetrics(CollectorRegistry()), self.clock)
            self.routers.append(scheduler)
            for worker in workers:
                worker.routers[name] = scheduler
                pool.observe(worker.worker_id.encode(), worker.heartbeat(name))
        self._requests = 0

    def request(self, tier: str = "default", tenant: str = "anonymous", n: int = 1, cap: int | None = None) -> ImageRequest:
        self._requests += 1
        return ImageRequest(request_id=f"req{self._requests}", prompt="p", size=SIZE, n=n, service_tier=tier,
                            tenant=tenant, tenant_max_images=cap)

    def start(self, stage: Stage = Stage.AR, router: int = 0, tier: str = "default", tenant: str = "anonymous",
              deadline_s: float = 600.0) -> tuple[asyncio.Task, ImageRequest]:
        """Admit a one-image request and run its `stage` job on router `router`, as a task."""
        scheduler = self.routers[router]
        request = self.request(tier, tenant)
        admission = scheduler.admit(request)
        payload = ARJob(prompt=ARPrompt(prompt="p", mm_processor_kwargs=MMProcessorKwargs.of(SIZE)),
                        sampling=ARSampling(temperature=1.0, top_p=1.0, top_k=1, seed=0))
        job = StageJob(stage=stage, request=request, image=admission.images[0], image_index=0, payload=payload,
                       deadline_at=self.clock.now() + deadline_s)

        async def run() -> JobResult:
            try:
                return await scheduler.run_job(job)
            finally:
                admission.release()

        return asyncio.create_task(run()), request


def served_requests(worker: SharedWorker) -> list[str]:
    """The request ids of the worker's finished jobs, in order ("req3.0.ar.0" -> "req3")."""
    return [job_id.split(".")[0] for job_id in worker.finished]


async def drain(worker: SharedWorker, tasks: list[asyncio.Task]) -> None:
    """Finish jobs one at a time until every task is done."""
    for _ in range(200):
        await settle()
        if all(t.done() for t in tasks):
            return
        if worker.running:
            worker.finish()
    raise AssertionError("tasks did not finish")


# -- one router -------------------------------------------------------------------------------


async def test_first_come_first_served_on_one_slot():
    ar = SharedWorker("ar0", Stage.AR, 1)
    fleet = Fleet(stage_config(), [ar])
    started = [fleet.start() for _ in range(4)]
    await drain(ar, [t for t, _ in started])
    assert served_requests(ar) == [r.request_id for _, r in started]
    assert ar.max_running == 1 and ar.refusals == 0


async def test_priority_tiers_go_first_and_lower_tiers_age():
    ar = SharedWorker("ar0", Stage.AR, 1)
    fleet = Fleet(stage_config(priority_aging_s=10), [ar])
    busy, _ = fleet.start()
    await settle()
    flex, flex_req = fleet.start(tier="flex")
    default, default_req = fleet.start(tier="default")
    prio, prio_req = fleet.start(tier="priority")
    await drain(ar, [busy, flex, default, prio])
    assert served_requests(ar)[1:] == [prio_req.request_id, default_req.request_id, flex_req.request_id]

    # Aged: a flex job that waited two aging periods is served before a default job that just came.
    ar.finished.clear()
    busy, _ = fleet.start()
    await settle()
    flex, flex_req = fleet.start(tier="flex")
    await fleet.clock.advance(25)
    default, default_req = fleet.start(tier="default")
    await drain(ar, [busy, flex, default])
    assert served_requests(ar)[1:] == [flex_req.request_id, default_req.request_id]


async def test_tenants_take_turns_within_a_tier():
    ar = SharedWorker("ar0", Stage.AR, 1)
    fleet = Fleet(stage_config(), [ar])
    flood = [fleet.start(tenant="batch") for _ in range(5)]
    await settle()
    one, one_req = fleet.start(tenant="interactive")
    await drain(ar, [t for t, _ in flood] + [one])
    order = served_requests(ar)
    # The batch key's first job was already running; the interactive key's one job is next.
    assert order[1] == one_req.request_id, order


async def test_tenant_cap_is_a_rate_limit():
    ar = SharedWorker("ar0", Stage.AR, 1)
    fleet = Fleet(stage_config(), [ar])
    scheduler = fleet.routers[0]
    first = scheduler.admit(fleet.request(tenant="k", n=3, cap=4))
    with pytest.raises(TenantOverLimit) as over:
        scheduler.admit(fleet.request(tenant="k", n=2, cap=4))
    assert over.value.status_code == 429 and over.value.code == "rate_limit_exceeded"
    assert "at most 4" in over.value.message and over.value.retry_after_s >= 1
    scheduler.admit(fleet.request(tenant="other", n=2, cap=4)).release()  # other keys are not affected
    first.release()
    scheduler.admit(fleet.request(tenant="k", n=2, cap=4)).release()


async def test_every_stage_bounds_its_line():
    """The DiT stage bounds admission too: a huge AR capacity does not let images pile up for one DiT slot."""
    ar, dit = SharedWorker("ar0", Stage.AR, 100), SharedWorker("dit0", Stage.DIT, 1)
    fleet = Fleet(stage_config(queue_limit_per_stage=4), [ar, dit])
    scheduler = fleet.routers[0]
    admitted = [scheduler.admit(fleet.request()) for _ in range(5)]  # 1 in the DiT slot + 4 waiting
    with pytest.raises(Overloaded) as full:
        scheduler.admit(fleet.request())
    assert full.value.status_code == 429 and "dit stage" in full.value.message
    assert full.value.retry_after_s >= 1
    admitted[0].release()
    scheduler.admit(fleet.request()).release()


async def test_a_heartbeat_sent_during_our_own_job_does_not_count_it_twice():
    """Heartbeats report the jobs run for *other* routers: one sent while this router's job ran
    must not make the idle worker look busy once that job is done (it did: 429s on an idle fleet)."""
    ar, dit = SharedWorker("ar0", Stage.AR, 1), SharedWorker("dit0", Stage.DIT, 1)
    fleet = Fleet(stage_config(queue_limit_per_stage=0), [ar, dit])
    scheduler = fleet.routers[0]
    task, _ = fleet.start()
    await settle()
    scheduler.pool.observe(b"ar0", ar.heartbeat("r0"))  # sent while our job runs
    with pytest.raises(Overloaded):
        scheduler.admit(fleet.request())  # busy: limit 0 beyond the one slot
    ar.finish()
    await task
    scheduler.admit(fleet.request()).release()  # idle again: admitted


async def test_estimated_wait_refuses_at_once_with_a_truthful_retry_after():
    dit = SharedWorker("dit0", Stage.DIT, 1)
    fleet = Fleet(stage_config(max_queue_wait_s=10), [dit, SharedWorker("ar0", Stage.AR, 100)])
    scheduler = fleet.routers[0]
    # Learn the DiT's job time: 2 s per job.
    task, _ = fleet.start(Stage.DIT)
    await settle()
    await fleet.clock.advance(2)
    dit.finish()
    await task
    assert scheduler.service_s[Stage.DIT] == pytest.approx(2.0)
    # One slot at 2 s per image: the 6th waiting image would wait 12 s > 10 s.
    admitted = [scheduler.admit(fleet.request()) for _ in range(6)]
    assert scheduler.estimated_wait_s("default") == pytest.approx(12.0)
    with pytest.raises(Overloaded) as refused:
        scheduler.admit(fleet.request())
    assert "wait about 12s" in refused.value.message
    assert refused.value.retry_after_s == pytest.approx(2.0)
    # A higher tier only waits behind its own tier and above: it is admitted.
    scheduler.admit(fleet.request(tier="priority")).release()
    for admission in admitted:
        admission.release()


async def test_the_wait_follows_the_pipeline():
    """A DiT backlog that clears while the new image is still in the AR stage costs it nothing;
    backlogs at both stages add up."""
    ar, dit = SharedWorker("ar0", Stage.AR, 1), SharedWorker("dit0", Stage.DIT, 1)
    fleet = Fleet(stage_config(), [ar, dit])
    scheduler = fleet.routers[0]
    scheduler.service_s[Stage.AR], scheduler.service_s[Stage.DIT] = 5.0, 1.0
    past_ar = [scheduler.admit(fleet.request()) for _ in range(4)]
    for admission in past_ar:
        admission.images[0].stages_left.discard(Stage.AR)  # these only wait for the DiT now
    # The DiT clears its 4 in 4 s; the new image reaches it after its 5 s AR job: no wait at all.
    assert scheduler.estimated_wait_s("default") == pytest.approx(0.0)
    # Two images ahead in the AR stage too: 2 x 5 s of AR wait, then the DiT is long free.
    in_ar = [scheduler.admit(fleet.request()) for _ in range(2)]
    assert scheduler.estimated_wait_s("default") == pytest.approx(10.0)
    # With a slow DiT (4 s), its backlog of 6 (24 s) outlasts the 15 s to reach it: 24 - 5 = 19 s of wait.
    scheduler.service_s[Stage.DIT] = 4.0
    assert scheduler.estimated_wait_s("default") == pytest.approx(19.0)
    for admission in past_ar + in_ar:
        admission.release()


async def test_a_fresh_fleet_promises_no_wait_it_cannot_estimate():
    """With max_queue_wait_s set and no job time known anywhere yet, the slots and one more round
    are admitted, nothing beyond."""
    ar, dit = SharedWorker("ar0", Stage.AR, 4), SharedWorker("dit0", Stage.DIT, 1)
    fleet = Fleet(stage_config(max_queue_wait_s=10), [ar, dit])
    scheduler = fleet.routers[0]
    first = scheduler.admit(fleet.request(n=2))  # the one DiT slot, and the next round
    with pytest.raises(Overloaded) as refused:
        scheduler.admit(fleet.request())
    assert "warming up" in refused.value.message and refused.value.retry_after_s == 1.0
    scheduler.service_s[Stage.DIT] = 1.0  # a DiT job finished: waits can be estimated now
    scheduler.admit(fleet.request()).release()
    first.release()


async def test_a_new_router_estimates_from_the_job_times_workers_report():
    """No job of its own yet (a router just started): the workers' heartbeats carry their job times."""
    ar, dit = SharedWorker("ar0", Stage.AR, 1), SharedWorker("dit0", Stage.DIT, 1)
    fleet = Fleet(stage_config(max_queue_wait_s=10), [ar, dit])
    scheduler = fleet.routers[0]
    assert scheduler.estimated_wait_s("default") is None
    for worker, seconds in ((ar, 1.0), (dit, 3.0)):
        heartbeat = worker.heartbeat("r0").model_copy(update={"job_seconds": seconds})
        scheduler.pool.observe(worker.worker_id.encode(), heartbeat)
    admitted = [scheduler.admit(fleet.request()) for _ in range(4)]
    # The 4 ahead reach the DiT at 1, 2, 3, 4 s (one AR slot, 1 s each) and leave it at 4, 7, 10, 13 s
    # (3 s each); the new image waits for that: it ends at 16 s instead of 4 s, 12 s of wait > 10 s.
    with pytest.raises(Overloaded) as refused:
        scheduler.admit(fleet.request())
    assert "wait about 12s" in refused.value.message
    for admission in admitted:
        admission.release()


async def test_failures_are_retried_elsewhere_then_fail_with_the_cause():
    a, b = SharedWorker("ar-a", Stage.AR, 1), SharedWorker("ar-b", Stage.AR, 1)
    fleet = Fleet(stage_config(max_retries=1), [a, b])
    task, _ = fleet.start()
    await settle()
    first = a if a.running else b
    first.finish(reply="lost")
    await settle()
    second = a if a.running else b
    assert second is not first  # the least recently picked worker takes the retry
    second.finish(reply="internal")
    with pytest.raises(StageFailed) as failed:
        await task
    assert failed.value.status_code == 502 and "after 2 attempt(s)" in failed.value.message


async def test_deadline_while_waiting_and_no_live_worker():
    ar = SharedWorker("ar0", Stage.AR, 1)
    fleet = Fleet(stage_config(no_worker_grace_s=5), [ar])
    busy, _ = fleet.start()
    waiting, _ = fleet.start(deadline_s=30)
    await fleet.clock.advance(31)
    with pytest.raises(DeadlineExceeded):
        await waiting
    assert not fleet.routers[0]._lines[Stage.AR]  # the expired job left the line
    ar.finish()
    await busy

    # A DiT job with no DiT worker at all: 503 naming the stage after the grace time.
    dit_job, _ = fleet.start(Stage.DIT)
    await fleet.clock.advance(4)
    assert not dit_job.done()
    await fleet.clock.advance(2)
    with pytest.raises(NoLiveWorkers) as none:
        await dit_job
    assert none.value.status_code == 503 and "dit" in none.value.message


async def test_a_cancelled_request_frees_its_slot_and_cancels_the_job():
    ar = SharedWorker("ar0", Stage.AR, 1)
    fleet = Fleet(stage_config(), [ar])
    running, _ = fleet.start()
    waiting, waiting_req = fleet.start()
    await settle()
    running.cancel()
    await settle()
    assert fleet.routers[0].transport.cancelled and waiting_req.request_id in next(iter(ar.running))
    ar.finish()
    await waiting


async def test_lora_jobs_go_where_their_adapters_are_loaded_else_to_any_free_worker():
    dit0, dit1 = SharedWorker("dit0", Stage.DIT, 1), SharedWorker("dit1", Stage.DIT, 1)
    fleet = Fleet(stage_config(), [SharedWorker("ar0", Stage.AR, 1), dit0, dit1])
    scheduler = fleet.routers[0]
    warm, cold = "a" * 64, "b" * 64
    # dit1's heartbeat says it has adapter `warm` loaded (dit0 would be picked first otherwise: its id).
    scheduler.pool.observe(b"dit1", dit1.heartbeat("r0").model_copy(update={"loaded_loras": [warm]}))

    def start_dit(*digests: str) -> asyncio.Task:
        request = fleet.request()
        admission = scheduler.admit(request)
        original = OriginalPrompt(prompt="p", height=SIZE.height, width=SIZE.width, seed=0, num_inference_steps=1,
                                  guidance_scale=1.0)
        loras = [LoraSpec(name=f"l{i}", path=f"l{i}.safetensors", digest=d, scale=1.0) for i, d in enumerate(digests)]
        payload = DiTJob(original_prompt=original, prior_token_ids=np.zeros((2, 2), dtype=np.int64), loras=loras)
        job = StageJob(stage=Stage.DIT, request=request, image=admission.images[0], image_index=0, payload=payload,
                       deadline_at=fleet.clock.now() + 600)
        return asyncio.create_task(scheduler.run_job(job))

    first = start_dit(warm)
    await settle()
    assert list(dit1.running) and not dit0.running  # the warm worker, though dit0 comes first otherwise
    second = start_dit(warm)  # dit1 is busy: any free worker takes it (and loads the adapter)
    await settle()
    assert list(dit0.running)
    dit0.finish()
    dit1.finish()
    await asyncio.gather(first, second, return_exceptions=True)
    # dit0 now counts as having `warm` too (the router noted the job it sent), and `cold` goes anywhere free.
    assert warm in scheduler.pool.workers["dit0"].loaded_loras
    third = start_dit(cold)
    await settle()
    assert len(dit0.running) + len(dit1.running) == 1
    (dit0 if dit0.running else dit1).finish()
    await asyncio.gather(third, return_exceptions=True)


# -- several routers sharing workers --------------------------------------------------------------


@pytest.mark.parametrize("routers", [2, 3])
async def test_routers_sharing_one_slot_queue_instead_of_failing(routers: int):
    """The measured bug: 2 routers, 1 AR slot, 8 requests gave four 502s. Now every request
    succeeds, the slot never holds two jobs, and service alternates between routers."""
    ar = SharedWorker("ar0", Stage.AR, 1)
    fleet = Fleet(stage_config(), [ar], routers=routers)
    started = [fleet.start(router=i % routers) for i in range(4 * routers)]
    await drain(ar, [t for t, _ in started])
    for task, _ in started:
        assert isinstance(task.result(), JobResult)
    assert ar.max_running == 1
    # Fair: among the jobs served, no router waits more than one turn of every other router.
    router_of = {r.request_id: i % routers for i, (_, r) in enumerate(started)}
    order = [router_of[r] for r in served_requests(ar)]
    for window in range(len(order) - routers * 2):
        assert set(order[window:window + routers * 2]) == set(range(routers)), order


async def test_an_offer_with_nothing_waiting_goes_to_the_next_router():
    ar = SharedWorker("ar0", Stage.AR, 1)
    fleet = Fleet(stage_config(), [ar], routers=2)
    first, _ = fleet.start(router=0)
    second, _ = fleet.start(router=1)  # refused: router 1 is now first in the worker's line
    await settle()
    assert ar.refusals == 1
    second.cancel()  # the client left: router 1 has nothing waiting any more
    await settle()
    third, _ = fleet.start(router=0)
    ar.finish()  # the slot is offered to router 1, which declines; router 0 gets it
    await drain(ar, [first, third])
    assert isinstance(third.result(), JobResult)


async def test_a_lost_offer_does_not_strand_a_router():
    """If an offer never arrives, the router probes the worker again after the back-off."""
    ar = SharedWorker("ar0", Stage.AR, 1)
    fleet = Fleet(stage_config(), [ar], routers=2)
    ar.routers["r1"] = _Deaf()  # router 1 never hears offers
    first, _ = fleet.start(router=0)
    second, _ = fleet.start(router=1)
    await settle()
    ar.finish()
    ar.slots.release("r1")  # the offer lapsed at the worker
    await fleet.clock.advance(2.5)
    fleet.routers[1].workers_changed()  # a heartbeat arrives
    await drain(ar, [first, second])
    assert isinstance(second.result(), JobResult)


class _Deaf:
    def slot_offered(self, worker_id: str) -> None:
        pass
