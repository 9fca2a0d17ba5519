"""Cancelling a request's work when its HTTP client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.types import Receive

from router.core.errors import ServiceError

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its images were ready; the work has been cancelled."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects (call it after the body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then raise ClientDisconnected).

    Both tasks are owned here: whichever way this returns (result, error,
    disconnect, or this handler itself being cancelled), neither outlives it.
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(wait_for_disconnect(request.receive), name="disconnect-watcher")
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        work_task.cancel()  # no-op when finished
        # Let the cancellation run through the orchestrator before the response goes out.
        await asyncio.wait({work_task, watcher})
    if not work_task.cancelled():
        return work_task.result()
    if not watcher.cancelled():
        watcher.exception()  # retrieved so asyncio does not warn
        raise ClientDisconnected()
    raise ServiceError("the request was cancelled inside the server")
