"""A worker's job slots, shared by every router it serves: who may start a job, who is next.

Routers do not see each other's jobs, so only the worker can keep its slots from being
oversubscribed. A router whose job finds no free slot is refused and put in line; each slot that
frees up is held for the router first in line, which is then offered it (the worker runtime sends
the SlotOffer and lets an unanswered offer lapse). Routers are so served in the order they were
refused: none starves, however fast the others re-dispatch. Pure bookkeeping, no I/O: the worker
runtime and the scheduler tests drive the same code.
"""

from __future__ import annotations

from typing import Generic, Hashable, TypeVar

R = TypeVar("R", bound=Hashable)


class SlotArbiter(Generic[R]):
    """`capacity` slots; routers are any hashable handle (the worker's link to each router)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.running = 0
        self.refused: list[R] = []  # routers refused for capacity, oldest first
        self.held: set[R] = set()  # routers a freed slot is held for (an offer is out)

    def free_for(self, router: R) -> int:
        """Slots `router` may fill now: free ones not held for another router."""
        return max(0, self.capacity - self.running - len(self.held - {router}))

    def try_start(self, router: R) -> bool:
        """A job from `router` arrived: start it (True), or refuse it and put `router` in line (False).
        Either way a slot held for `router` is its no longer."""
        if self.free_for(router) > 0:
            self.held.discard(router)
            self.running += 1
            return True
        self.held.discard(router)
        if router not in self.refused:
            self.refused.append(router)
        return False

    def finish(self) -> None:
        """A job ended (done, failed or cancelled): its slot is free."""
        self.running -= 1

    def release(self, router: R) -> None:
        """`router` declined its offer, or the offer lapsed: the held slot is free again."""
        self.held.discard(router)

    def forget(self, router: R) -> None:
        """`router` is gone: out of line, and nothing held for it."""
        self.held.discard(router)
        if router in self.refused:
            self.refused.remove(router)

    def next_offers(self) -> list[R]:
        """Hold each free slot for the router refused longest ago; returns the routers to offer one."""
        offers = []
        while self.refused and self.capacity - self.running - len(self.held) > 0:
            router = self.refused.pop(0)
            self.held.add(router)
            offers.append(router)
        return offers
