"""The router's table of workers: soft state rebuilt from heartbeats alone.

Nothing here is persisted or shared between router replicas; a worker that
heartbeats is known, one that stops for `peer_timeout_s` is dead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.protocol import Heartbeat, Stage, WorkerInfo


@dataclass
class WorkerState:
    info: WorkerInfo
    identity: bytes
    last_seen: float
    draining: bool = False
    # Jobs this router has sent the worker and not yet heard back about.
    assigned: set[str] = field(default_factory=set)

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

    def observe(self, identity: bytes, heartbeat: Heartbeat, now: float | None = None) -> bool:
        """Record a heartbeat; True when the worker is new to this router."""
        now = time.monotonic() if now is None else now
        info = heartbeat.info
        state = self.workers.get(info.worker_id)
        if state is None or state.identity != identity:
            self.workers[info.worker_id] = WorkerState(info, identity, now, heartbeat.draining)
            return True
        state.info, state.last_seen, state.draining = info, now, heartbeat.draining
        return False

    def remove(self, worker_id: str) -> WorkerState | None:
        return self.workers.pop(worker_id, None)

    def expire(self, now: float | None = None) -> list[WorkerState]:
        """Drop and return the workers silent for longer than the peer timeout."""
        now = time.monotonic() if now is None else now
        dead = [w for w in self.workers.values() if now - w.last_seen > self.peer_timeout_s]
        for w in dead:
            del self.workers[w.info.worker_id]
        return dead

    def live(self, stage: Stage) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.info.stage == stage and not w.draining]

    def pick(self, stage: Stage) -> WorkerState | None:
        """The least-loaded live worker of the stage with a free slot."""
        candidates = [w for w in self.live(stage) if w.free_slots > 0]
        return min(candidates, key=lambda w: (w.load, len(w.assigned), w.info.worker_id), default=None)

    def free_slots(self, stage: Stage) -> int:
        """Slots of the stage's live workers that no job of this router holds."""
        return sum(max(0, w.free_slots) for w in self.live(stage))

    def capacity(self, stage: Stage) -> int:
        return sum(w.info.capacity for w in self.live(stage))

    def counts(self) -> dict[str, int]:
        return {stage.value: len(self.live(stage)) for stage in Stage}
