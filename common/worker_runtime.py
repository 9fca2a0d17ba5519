"""The worker side of the bus, shared by the AR and DiT workers.

A worker connects a DEALER socket to each router it is given (routers bind),
announces itself with heartbeats that carry its full registration, runs up to
`capacity` jobs at once, answers each with a result or a typed error, and
honours cancels and deadlines. A router that goes silent is reconnected to
with a fresh socket; since every heartbeat re-registers, a restarted router
finds its workers again with no manual step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import zmq
import zmq.asyncio

from common.protocol import (
    ErrorCode,
    Goodbye,
    Heartbeat,
    JobCancel,
    JobError,
    JobProgress,
    JobRequest,
    JobResult,
    ProtocolError,
    RegistrationRefused,
    ResultPayload,
    RouterPing,
    WorkerInfo,
    decode,
    encode,
)
from common.metrics import WorkerMetrics
from common.stage_config import BusConfig

logger = logging.getLogger(__name__)

# How long a drained worker's sockets may take to flush queued replies on exit.
_DRAIN_LINGER_MS = 2000


class JobRejected(Exception):
    """Raised by a handler for input it cannot serve; becomes a BAD_REQUEST error (not retried)."""


class WorkerRefused(Exception):
    """Every router refused this worker's registration (e.g. another stage config); says why."""


class JobProgressReporter:
    """How a running job tells its router how far it is; callable from any thread.

    Counts (`steps`) are sent only if the router asked for progress, at most every
    `min_interval_s` plus the last one; previews are sent whenever the job makes them.
    Sends never block: under back-pressure a progress message is dropped, not queued.
    """

    def __init__(self, job: JobRequest, worker_id: str, link: "_RouterLink", min_interval_s: float = 0.1):
        self.job, self.worker_id, self.link = job, worker_id, link
        self.min_interval_s = min_interval_s
        self._loop = asyncio.get_running_loop()
        self._last_sent = 0.0
        self._last_done: int | None = None

    @property
    def wants_steps(self) -> bool:
        return self.job.progress

    def steps(self, done: int, total: int) -> None:
        """`done` of `total` units (tokens, denoising steps) are finished."""
        if not self.job.progress or done == self._last_done:
            return
        now = time.monotonic()
        if done < total and now - self._last_sent < self.min_interval_s:
            return
        self._last_sent, self._last_done = now, done
        self._send(JobProgress(job_id=self.job.job_id, worker_id=self.worker_id, done=done, total=total))

    def preview(self, index: int, image: bytes, done: int, total: int) -> None:
        """The `index`-th preview image of this job, made after `done` of `total` steps."""
        self._send(JobProgress(job_id=self.job.job_id, worker_id=self.worker_id, done=done, total=total,
                               preview=image, preview_index=index))

    def _send(self, message: JobProgress) -> None:
        self._loop.call_soon_threadsafe(self.link.send_nowait, message)


class StageHandler(Protocol):
    """What a stage plugs into the runtime."""

    async def run(self, job: JobRequest, progress: JobProgressReporter) -> tuple[ResultPayload, dict[str, float]]:
        """Run one job; return its payload and timings, reporting progress on the way. Cancelling
        the awaiting task must stop the work promptly (and only return once the compute has
        actually stopped)."""


@dataclass
class _RunningJob:
    job: JobRequest
    task: asyncio.Task
    link: "_RouterLink"


class _RouterLink:
    """One DEALER connection to one router."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, identity: bytes, bus_config: BusConfig):
        self.ctx, self.address, self.identity, self.bus_config = ctx, address, identity, bus_config
        self.last_router_ping = time.monotonic()
        self.refused_because: str | None = None
        self.socket = self._connect()

    def _connect(self) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.bus_config.max_message_bytes)
        # Don't pile up heartbeats for a router that is gone; they are resent anyway.
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.connect(self.address)
        return sock

    def reconnect(self) -> None:
        self.socket.close(linger=0)
        self.socket = self._connect()
        self.last_router_ping = time.monotonic()

    async def send(self, message) -> None:
        try:
            await self.socket.send_multipart(encode(message), copy=False)
        except zmq.ZMQError as exc:
            logger.warning("send to router %s failed: %s", self.address, exc)

    def send_nowait(self, message) -> None:
        """Send now or drop (for progress, which the next message supersedes)."""
        try:
            self.socket.send_multipart(encode(message), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            logger.debug("router %s is not reading: dropped a %s", self.address, type(message).__name__)
        except zmq.ZMQError as exc:
            logger.warning("send to router %s failed: %s", self.address, exc)


class StageWorker:
    """Runs a stage handler behind the bus until stopped or drained."""

    def __init__(
        self,
        info: WorkerInfo,
        router_addresses: list[str],
        handler: StageHandler,
        bus_config: BusConfig,
        metrics: WorkerMetrics,
    ):
        self.info = info
        self.metrics = metrics
        self.handler = handler
        self.bus_config = bus_config
        self.router_addresses = router_addresses
        self.ctx = zmq.asyncio.Context()
        self.links: list[_RouterLink] = []
        self.jobs: dict[str, _RunningJob] = {}
        self.draining = False
        self._stopped = asyncio.Event()
        self._refusal: WorkerRefused | None = None
        self._tasks: list[asyncio.Task] = []

    async def serve(self) -> None:
        """Connect, heartbeat and serve jobs until `stop()` or a finished `drain()`.

        Raises WorkerRefused when every router refused the registration."""
        identity = self.info.worker_id.encode()
        self.links = [_RouterLink(self.ctx, addr, identity, self.bus_config) for addr in self.router_addresses]
        for link in self.links:
            self._tasks.append(asyncio.create_task(self._receive_loop(link), name=f"recv:{link.address}"))
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(link), name=f"hb:{link.address}"))
        logger.info("worker %s (%s) serving routers %s", self.info.worker_id, self.info.stage.value, self.router_addresses)
        try:
            await self._stopped.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._cancel_all_jobs()
            for link in self.links:
                # After a drain the last results and the Goodbye may still sit in the queue: let them out.
                link.socket.close(linger=_DRAIN_LINGER_MS if self.draining else 0)
            self.ctx.term()
        if self._refusal is not None:
            raise self._refusal

    def stop(self) -> None:
        self._stopped.set()

    async def drain(self, grace_s: float) -> None:
        """Stop taking work, let in-flight jobs finish (up to `grace_s`), deregister, stop."""
        self.draining = True
        logger.info("draining: %d job(s) in flight, grace %.1fs", len(self.jobs), grace_s)
        for link in self.links:
            await link.send(self._heartbeat())
        pending = [j.task for j in self.jobs.values()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            if late:
                logger.warning("grace period over: cancelling %d job(s)", len(late))
        await self._cancel_all_jobs()
        for link in self.links:
            await link.send(Goodbye(worker_id=self.info.worker_id))
        self.stop()

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(info=self.info, draining=self.draining)

    async def _heartbeat_loop(self, link: _RouterLink) -> None:
        while True:
            await link.send(self._heartbeat())
            if time.monotonic() - link.last_router_ping > self.bus_config.peer_timeout_s:
                logger.warning("router %s silent for %.1fs: reconnecting", link.address, self.bus_config.peer_timeout_s)
                # Jobs from the lost router can't be answered; their router re-dispatches them.
                await self._cancel_jobs_of(link)
                link.reconnect()
            await asyncio.sleep(self.bus_config.heartbeat_interval_s)

    async def _receive_loop(self, link: _RouterLink) -> None:
        while True:
            sock = link.socket
            try:
                frames = await sock.recv_multipart(copy=False)
            except (zmq.ZMQError, asyncio.CancelledError):
                # reconnect() closed the socket under us, which cancels the pending recv: go on with the
                # new one. Without this the loop died on the first reconnect and the worker went deaf.
                if sock is not link.socket and not asyncio.current_task().cancelling():
                    continue
                raise
            try:
                message = decode([f.buffer for f in frames])
            except ProtocolError as exc:
                logger.warning("dropping malformed message from router %s: %s", link.address, exc)
                continue
            link.last_router_ping = time.monotonic()
            if isinstance(message, RouterPing):
                continue
            if isinstance(message, RegistrationRefused):
                self._on_refused(link, message.reason)
                continue
            if isinstance(message, JobRequest):
                await self._accept(message, link)
            elif isinstance(message, JobCancel):
                running = self.jobs.get(message.job_id)
                if running is not None:
                    logger.info("[%s] job %s cancel requested", running.job.log_tag, message.job_id)
                    running.task.cancel()
            else:
                logger.warning("dropping unexpected %s from router %s", type(message).__name__, link.address)

    def _on_refused(self, link: _RouterLink, reason: str) -> None:
        if link.refused_because is None:
            logger.error("router %s refused this worker: %s", link.address, reason)
        link.refused_because = reason
        if all(other.refused_because for other in self.links):
            self._refusal = WorkerRefused(reason)
            self.stop()

    async def _accept(self, job: JobRequest, link: _RouterLink) -> None:
        if job.job_id in self.jobs:
            return  # a duplicate delivery; the first one answers
        if self.draining or len(self.jobs) >= self.info.capacity:
            reason = "draining" if self.draining else f"at capacity ({self.info.capacity})"
            await link.send(JobError(job_id=job.job_id, worker_id=self.info.worker_id, code=ErrorCode.OVERLOADED, message=f"worker {reason}"))
            return
        logger.info("[%s] job %s started", job.log_tag, job.job_id)
        task = asyncio.create_task(self._run(job, link), name=f"job:{job.job_id}")
        self.jobs[job.job_id] = _RunningJob(job, task, link)
        task.add_done_callback(lambda _t, jid=job.job_id: self.jobs.pop(jid, None))

    async def _run(self, job: JobRequest, link: _RouterLink) -> None:
        wid = self.info.worker_id
        started = time.monotonic()
        self.metrics.in_flight.inc()
        try:
            reply = await self._run_to_reply(job, link)
        except asyncio.CancelledError:
            logger.info("[%s] job %s cancelled after %.2fs", job.log_tag, job.job_id, time.monotonic() - started)
            self.metrics.job_finished("cancelled")
            await link.send(JobError(job_id=job.job_id, worker_id=wid, code=ErrorCode.CANCELLED, message="cancelled"))
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.job_seconds.observe(time.monotonic() - started)
        self.metrics.job_finished("ok" if isinstance(reply, JobResult) else reply.code.value)
        await link.send(reply)

    async def _run_to_reply(self, job: JobRequest, link: _RouterLink) -> JobResult | JobError:
        wid = self.info.worker_id
        started = time.monotonic()
        try:
            progress = JobProgressReporter(job, wid, link)
            payload, timings = await asyncio.wait_for(self.handler.run(job, progress), timeout=job.deadline_s)
        except asyncio.TimeoutError:
            logger.warning("[%s] job %s exceeded its %.1fs deadline", job.log_tag, job.job_id, job.deadline_s)
            return JobError(
                job_id=job.job_id,
                worker_id=wid,
                code=ErrorCode.TIMEOUT,
                message=f"{self.info.stage.value} stage exceeded its {job.deadline_s:.0f}s deadline",
            )
        except JobRejected as exc:
            logger.info("[%s] job %s rejected: %s", job.log_tag, job.job_id, exc)
            return JobError(job_id=job.job_id, worker_id=wid, code=ErrorCode.BAD_REQUEST, message=str(exc))
        except Exception as exc:
            logger.exception("[%s] job %s failed", job.log_tag, job.job_id)
            return JobError(job_id=job.job_id, worker_id=wid, code=ErrorCode.INTERNAL, message=f"{type(exc).__name__}: {exc}")
        timings = {**timings, "worker_s": time.monotonic() - started}
        logger.info("[%s] job %s done in %.2fs", job.log_tag, job.job_id, timings["worker_s"])
        return JobResult(job_id=job.job_id, worker_id=wid, payload=payload, timings=timings)

    async def _cancel_jobs_of(self, link: _RouterLink) -> None:
        tasks = [j.task for j in self.jobs.values() if j.link is link]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _cancel_all_jobs(self) -> None:
        tasks = [j.task for j in self.jobs.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_stage_worker(worker: StageWorker, drain_grace_s: float) -> None:
    """Serve until SIGINT/SIGTERM, then drain: finish in-flight jobs (up to the grace period),
    deregister and return."""
    import signal

    loop = asyncio.get_running_loop()
    drain_task: asyncio.Task | None = None

    def on_signal(signum: int) -> None:
        nonlocal drain_task
        if drain_task is None:
            logger.info("%s received: draining", signal.Signals(signum).name)
            drain_task = asyncio.create_task(worker.drain(drain_grace_s))
        else:
            worker.stop()  # a second signal stops at once

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await worker.serve()
    finally:
        if drain_task is not None and not drain_task.done():
            drain_task.cancel()
