"""The router's table of workers: soft state rebuilt from heartbeats alone.

Nothing here is persisted or shared between router replicas; a worker that
heartbeats is known, one that stops for `peer_timeout_s` is dead.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, get_args

from common.protocol import Heartbeat, Stage, WorkerInfo

# Why a worker left the table: silent past the peer timeout; said goodbye (after a drain); came back
# as a new process under the same id; its connection was gone when the router sent to it.
LossReason = Literal["timeout", "left", "restarted", "unreachable"]
LOSS_REASONS: tuple[LossReason, ...] = get_args(LossReason)


@dataclass
class WorkerState:
    """One worker as this router knows it. The bus keeps the membership fields (info, identity,
    last_seen, draining, and the load the worker reports); the Scheduler alone keeps the slot fields."""

    info: WorkerInfo
    identity: bytes
    last_seen: float
    draining: bool = False
    # From its latest heartbeat: jobs it runs for other routers, and slots free to this one.
    running_elsewhere: int = 0
    reported_free: int = 0
    job_seconds: float | None = None  # the worker's running average of job times
    # sha256 digests of the LoRA adapters the worker has loaded (its heartbeat; the Scheduler adds the
    # adapters of each job it sends, which the worker loads).
    loaded_loras: frozenset[str] = frozenset()
    # Scheduler: jobs this router has given the worker and not yet heard back about.
    assigned: set[str] = field(default_factory=set)
    # Scheduler: when the worker last refused a job for capacity (it then queues this router for a
    # SlotOffer); None when it has not since.
    refused_at: float | None = None
    # Scheduler: the worker holds a freed slot for this router (a SlotOffer not yet answered).
    offered: bool = False
    # Scheduler: when this router last chose the worker (a pick counter); 0 = never.
    last_picked: int = 0

    @property
    def load(self) -> float:
        return len(self.assigned) / self.info.capacity


class WorkerPool:
    """Who is out there: workers by id, from heartbeats, with their churn counted per stage."""

    def __init__(self, peer_timeout_s: float):
        self.peer_timeout_s = peer_timeout_s
        self.workers: dict[str, WorkerState] = {}
        # Churn since start, per stage (and reason): exported as counters at scrape time
        # (router/core/metrics.py), so a worker that keeps dropping out and coming back shows.
        self.registrations: Counter[Stage] = Counter()
        self.losses: Counter[tuple[Stage, LossReason]] = Counter()

    def observe(self, identity: bytes, heartbeat: Heartbeat) -> bool:
        """Record a heartbeat; True when the worker is new to this router."""
        now = time.monotonic()
        info = heartbeat.info
        state = self.workers.get(info.worker_id)
        new = state is None or state.identity != identity
        if new:
            state = self.workers[info.worker_id] = WorkerState(info, identity, now)
            self.registrations[info.stage] += 1
        state.info, state.last_seen, state.draining = info, now, heartbeat.draining
        state.running_elsewhere, state.reported_free = heartbeat.running_elsewhere, heartbeat.free_slots
        state.job_seconds = heartbeat.job_seconds
        state.loaded_loras = frozenset(heartbeat.loaded_loras)
        return new

    def remove(self, worker_id: str, reason: LossReason) -> WorkerState | None:
        """Forget a worker; `reason` labels the loss in the metrics."""
        state = self.workers.pop(worker_id, None)
        if state is not None:
            self.losses[state.info.stage, reason] += 1
        return state

    def expire(self) -> list[WorkerState]:
        """Drop and return the workers silent for longer than the peer timeout."""
        now = time.monotonic()
        dead = [w for w in self.workers.values() if now - w.last_seen > self.peer_timeout_s]
        for w in dead:
            del self.workers[w.info.worker_id]
            self.losses[w.info.stage, "timeout"] += 1
        return dead

    def live(self, stage: Stage) -> list[WorkerState]:
        """The stage's registered workers that are not draining."""
        return [w for w in self.workers.values() if w.info.stage == stage and not w.draining]

    def capacity(self, stage: Stage) -> int:
        """Slots of the stage's live (not draining) workers."""
        return sum(w.info.capacity for w in self.live(stage))

    def counts(self) -> dict[str, int]:
        return {stage.value: len(self.live(stage)) for stage in Stage}
