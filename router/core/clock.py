"""Time as the scheduler sees it: one interface, so tests can drive deadlines with a fake clock."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...

    async def wait(self, future: asyncio.Future, timeout: float) -> bool:
        """Wait until `future` is done (True) or `timeout` seconds passed (False); never cancels it."""
        ...


class MonotonicClock:
    """The real clock: time.monotonic and the event loop's timers."""

    def now(self) -> float:
        return time.monotonic()

    async def wait(self, future: asyncio.Future, timeout: float) -> bool:
        if not future.done() and timeout > 0:
            await asyncio.wait({future}, timeout=timeout)
        return future.done()
