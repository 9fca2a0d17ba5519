"""The router's table of workers: soft state rebuilt from heartbeats alone.

Nothing here is persisted or shared between router replicas; a worker that
heartbeats is known, one that stops for `peer_timeout_s` is dead.
"""

from __future__ import annotations

import itertools
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
    info: WorkerInfo
    identity: bytes
    last_seen: float
    draining: bool = False
    # Jobs this router has sent the worker and not yet heard back about.
    assigned: set[str] = field(default_factory=set)
    # When this router last chose the worker (WorkerPool's pick counter); 0 = never.
    last_picked: int = 0

    @property
    def free_slots(self) -> int:
        return self.info.capacity - len(self.assigned)

    @property
    def load(self) -> float:
        return len(self.assigned) / self.info.capacity


class WorkerPool:
    def __init__(self, peer_timeout_s: float):
        self.peer_timeout_s = peer_timeout_s
        self.workers: dict[str, WorkerState] = {}
        self._picks = itertools.count(1)
        # Churn since start, per stage (and reason): exported as counters at scrape time
        # (router/core/metrics.py), so a worker that keeps dropping out and coming back shows.
        self.registrations: Counter[Stage] = Counter()
        self.losses: Counter[tuple[Stage, LossReason]] = Counter()

    def observe(self, identity: bytes, heartbeat: Heartbeat) -> bool:
        """Record a heartbeat; True when the worker is new to this router."""
        now = time.monotonic()
        info = heartbeat.info
        state = self.workers.get(info.worker_id)
        if state is None or state.identity != identity:
            self.workers[info.worker_id] = WorkerState(info, identity, now, heartbeat.draining)
            self.registrations[info.stage] += 1
            return True
        state.info, state.last_seen, state.draining = info, now, heartbeat.draining
        return False

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
        return [w for w in self.workers.values() if w.info.stage == stage and not w.draining]

    def pick(self, stage: Stage) -> WorkerState | None:
        """The least-loaded live worker of the stage with a free slot."""
        candidates = [w for w in self.live(stage) if w.free_slots > 0]
        # Among equally loaded workers, the one picked longest ago: requests one at a time rotate over
        # every worker (a new replica takes work at once; other routers' jobs, which we can't see,
        # spread too) instead of always landing on the same one.
        worker = min(candidates, key=lambda w: (w.load, len(w.assigned), w.last_picked, w.info.worker_id), default=None)
        if worker is not None:
            worker.last_picked = next(self._picks)
        return worker

    def free_slots(self, stage: Stage) -> int:
        """Slots of the stage's live workers that no job of this router holds."""
        return sum(max(0, w.free_slots) for w in self.live(stage))

    def capacity(self, stage: Stage) -> int:
        """Slots of the stage's live (not draining) workers."""
        return sum(w.info.capacity for w in self.live(stage))

    def busy_slots(self, stage: Stage) -> int:
        """Jobs of this router on the stage's workers, draining ones included (they still run them)."""
        return sum(len(w.assigned) for w in self.workers.values() if w.info.stage == stage)

    def counts(self) -> dict[str, int]:
        return {stage.value: len(self.live(stage)) for stage in Stage}
