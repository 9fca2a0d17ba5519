"""The router's end of the bus: a bound ROUTER socket, heartbeats both ways, job futures.

Workers connect to us. Every message from a worker is decoded with limits and
validated; anything malformed is logged and dropped, so a worker sending
garbage cannot take the router down. Replies are matched to the job and the
worker it was sent to: late or duplicate replies (say, from a worker we had
declared dead) are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import zmq
import zmq.asyncio

from common.protocol import (
    Goodbye,
    Heartbeat,
    JobCancel,
    JobError,
    JobRequest,
    JobResult,
    ProtocolError,
    RouterPing,
    decode,
    encode,
)
from common.stage_config import BusConfig
from router.worker_pool import WorkerPool, WorkerState

logger = logging.getLogger(__name__)


class WorkerLost(Exception):
    """The worker running a job died or left before answering."""


@dataclass
class _PendingJob:
    future: asyncio.Future
    worker_id: str


class RouterBus:
    def __init__(self, bind_address: str, bus: BusConfig, pool: WorkerPool):
        self.bind_address = bind_address
        self.bus = bus
        self.pool = pool
        self.router_id = uuid.uuid4().hex[:12]
        self.ctx = zmq.asyncio.Context()
        self.socket: zmq.asyncio.Socket | None = None
        self.pending: dict[str, _PendingJob] = {}
        # Set, then replaced, whenever a worker slot may have opened or a worker appeared. An Event,
        # not a Condition: waiters cancelled together (an n>1 request failing) could leave a
        # Condition's lock held and every later request stuck behind it.
        self._slots_event = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.bus.max_message_bytes)
        # Sending to an unknown identity raises instead of vanishing silently.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A worker that reconnects (new socket, same identity) takes its identity over at once,
        # instead of being refused while its old connection is still being torn down.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.bind(self.bind_address)
        self.socket = sock
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="bus-recv"),
            asyncio.create_task(self._liveness_loop(), name="bus-liveness"),
        ]
        logger.info("bus bound at %s (router %s)", self.bind_address, self.router_id)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in self.pending.values():
            if not job.future.done():
                job.future.set_exception(WorkerLost("router shutting down"))
        if self.socket is not None:
            self.socket.close(linger=0)
        self.ctx.term()

    async def submit(self, worker: WorkerState, job: JobRequest) -> asyncio.Future:
        """Send a job to a worker; the future resolves to its JobResult / JobError or WorkerLost."""
        future = asyncio.get_running_loop().create_future()
        self.pending[job.job_id] = _PendingJob(future, worker.info.worker_id)
        worker.assigned.add(job.job_id)
        if not await self._send(worker.identity, job):
            self._finish(job.job_id, exception=WorkerLost(f"worker {worker.info.worker_id} unreachable"))
        return future

    async def cancel(self, job_id: str) -> None:
        """Tell the worker to stop a job and free its slot now (the worker's late reply is dropped)."""
        pending = self.pending.get(job_id)
        if pending is None:
            return
        worker = self.pool.workers.get(pending.worker_id)
        if worker is not None:
            await self._send(worker.identity, JobCancel(job_id=job_id))
        self._finish(job_id, cancel=True)

    def _finish(self, job_id: str, result=None, exception: BaseException | None = None, cancel: bool = False) -> None:
        pending = self.pending.pop(job_id, None)
        if pending is None:
            return
        worker = self.pool.workers.get(pending.worker_id)
        if worker is not None:
            worker.assigned.discard(job_id)
        if not pending.future.done():
            if cancel:
                pending.future.cancel()  # nobody awaits it any more; an exception would be "never retrieved"
            elif exception is not None:
                pending.future.set_exception(exception)
            else:
                pending.future.set_result(result)
        self._notify_slots()

    async def wait_for_slots(self, timeout: float) -> None:
        """Return when a worker slot may have opened or a worker appeared, or after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._slots_event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _notify_slots(self) -> None:
        self._slots_event.set()
        self._slots_event = asyncio.Event()

    def _spawn(self, coro) -> None:
        # Owned: close() cancels whatever is still running.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _send(self, identity: bytes, message) -> bool:
        try:
            # Never block: a peer that stops reading fills its queue, and waiting on it would stall
            # the liveness loop (and with it dead-worker detection) for everyone.
            await self.socket.send_multipart([identity, *encode(message)], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:
            logger.warning("send to worker %r failed: %s", identity, exc)
            return False

    async def _receive_loop(self) -> None:
        while True:
            frames = await self.socket.recv_multipart(copy=False)
            identity = bytes(frames[0].buffer)
            try:
                message = decode([f.buffer for f in frames[1:]])
            except ProtocolError as exc:
                logger.warning("dropping malformed message from %r: %s", identity[:64], str(exc)[:300])
                continue
            except Exception:  # decode() should only raise ProtocolError; the loop must survive anyway
                logger.exception("dropping undecodable message from %r", identity[:64])
                continue
            try:
                self._handle(identity, message)
            except Exception:  # one bad message must never end the loop
                logger.exception("error handling %s from %r", type(message).__name__, identity[:64])

    def _handle(self, identity: bytes, message) -> None:
        if isinstance(message, Heartbeat):
            if message.info.worker_id.encode() != identity:
                logger.warning("heartbeat for %s from identity %r dropped", message.info.worker_id, identity[:64])
                return
            known = self.pool.workers.get(message.info.worker_id)
            if known is not None and (known.info.pid, known.info.host) != (message.info.pid, message.info.host):
                # Restarted under the same id before it was declared dead: its jobs died with the old process.
                logger.warning("worker %s restarted (pid %d -> %d)", known.info.worker_id, known.info.pid, message.info.pid)
                self._fail_worker_jobs(known.info.worker_id, "restarted")
                self.pool.remove(known.info.worker_id)
            if self.pool.observe(identity, message):
                info = message.info
                logger.info("worker %s registered: stage=%s capacity=%d host=%s", info.worker_id, info.stage.value, info.capacity, info.host)
                self._spawn(self._send(identity, RouterPing(router_id=self.router_id)))
                # Only a new worker opens slots here; finished jobs notify in _finish.
                self._notify_slots()
        elif isinstance(message, Goodbye):
            state = self.pool.workers.get(message.worker_id)
            if state is not None and state.identity == identity:
                logger.info("worker %s deregistered", message.worker_id)
                self._fail_worker_jobs(message.worker_id, "left")
                self.pool.remove(message.worker_id)
        elif isinstance(message, (JobResult, JobError)):
            pending = self.pending.get(message.job_id)
            if pending is None or pending.worker_id != message.worker_id or message.worker_id.encode() != identity:
                logger.info("dropping late or duplicate reply for job %s from %s", message.job_id, message.worker_id)
                return
            self._finish(message.job_id, result=message)
        else:
            logger.warning("dropping unexpected %s from %r", type(message).__name__, identity[:64])

    def _fail_worker_jobs(self, worker_id: str, why: str) -> None:
        for job_id in [j for j, p in self.pending.items() if p.worker_id == worker_id]:
            self._finish(job_id, exception=WorkerLost(f"worker {worker_id} {why} while running the job"))

    async def _liveness_loop(self) -> None:
        ping = RouterPing(router_id=self.router_id)
        while True:
            for dead in self.pool.expire():
                silent = time.monotonic() - dead.last_seen
                logger.warning("worker %s (%s) silent for %.1fs: marked dead", dead.info.worker_id, dead.info.stage.value, silent)
                self._fail_worker_jobs(dead.info.worker_id, "died")
            for worker in list(self.pool.workers.values()):
                await self._send(worker.identity, ping)
            await asyncio.sleep(self.bus.heartbeat_interval_s)
