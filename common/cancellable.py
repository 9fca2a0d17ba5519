"""Blocking model work in a thread that stops when the awaiting task is cancelled.

Both stages run their compute (AR token generation, DiT denoising) in a worker
thread so the event loop keeps serving the bus. A thread cannot be killed, so
cancellation is cooperative: the work gets a `threading.Event`, checks it at
every token or denoising step, and raises `Cancelled` when it is set. The
awaiting task is only released once the thread has really stopped, so a freed
slot never overlaps with compute still running.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


class Cancelled(Exception):
    """Raised by blocking work that saw its cancel event set."""


async def run_cancellable(work: Callable[[threading.Event], T]) -> T:
    """Run `work(cancel_event)` in a thread and return its result.

    If the calling task is cancelled, set the event, wait for `work` to return,
    then re-raise the cancellation.
    """
    cancel = threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(work, cancel))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        await asyncio.gather(future, return_exceptions=True)
        raise
