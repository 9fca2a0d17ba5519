"""The router's end of the bus: a bound ROUTER socket, heartbeats both ways, job futures.

Workers connect to us. Every message from a worker is decoded with limits and
validated; anything malformed is logged and dropped, so a worker sending
garbage cannot take the router down. Replies are matched to the job and the
worker it was sent to: late or duplicate replies (say, from a worker we had
declared dead) are dropped.

With CURVE (`RouterCurve`) the socket is a CURVE server: traffic is encrypted and only workers
whose public key is in the allow-list directory complete the handshake (common/bus_security.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from common.bus_security import (
    REFUSED_BAD_HANDSHAKE,
    REFUSED_NO_KEY,
    REFUSED_UNEXPECTED_CURVE,
    REFUSED_UNKNOWN_KEY,
    AllowList,
    RouterCurve,
    ZapAuthenticator,
    configure_server,
)
from common.protocol import (
    Goodbye,
    Heartbeat,
    JobCancel,
    JobError,
    JobProgress,
    JobRequest,
    JobResult,
    OfferDeclined,
    ProtocolError,
    RegistrationRefused,
    RouterPing,
    SlotOffer,
    WorkerInfo,
    decode,
    encode,
)
from common.stage_config import BusConfig
from router.core.metrics import RouterMetrics
from router.core.scheduler import WorkerLost
from router.core.worker_pool import WorkerPool, WorkerState

logger = logging.getLogger(__name__)

# A refused peer keeps retrying (our workers every peer timeout, a bare ZeroMQ peer every 0.1 s):
# every refusal is counted, but the log repeats a (reason, peer, key) at most this often.
_REFUSAL_LOG_EVERY_S = 60.0
# Not EVENT_HANDSHAKE_FAILED_NO_DETAIL: a TCP probe that connects and hangs up is no refusal.
_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


def is_local_bind(address: str) -> bool:
    """Whether a ZeroMQ bind address listens on this machine only (loopback tcp://, ipc://, inproc://)."""
    if not address.startswith("tcp://"):
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: assume reachable


class BusEvents(Protocol):
    """Who hears what happens on the bus (the Scheduler)."""

    def workers_changed(self) -> None:
        """A worker joined, left or heartbeated."""

    def slot_offered(self, worker_id: str) -> None:
        """A worker holds a freed slot for this router."""


@dataclass
class _PendingJob:
    future: asyncio.Future
    worker_id: str
    on_progress: Callable[[JobProgress], None] | None = None


class RouterBus:
    """The bound ROUTER socket, a transport: registrations and liveness (the WorkerPool), jobs sent
    and their replies matched to futures; what it hears goes to `events` (the Scheduler, which owns
    every slot and decides what runs where).

    Only workers whose stage-config fingerprint equals `config_fingerprint` are
    registered; others are told why (RegistrationRefused), logged once and counted.
    With `curve`, only workers whose key is in its allow-list get through the handshake; every
    refused handshake is counted in glm_router_workers_refused (reason curve_*) and logged with
    the peer's address and key prefix (the same peer and key at most once a minute).
    """

    def __init__(self, bind_address: str, bus_config: BusConfig, pool: WorkerPool, metrics: RouterMetrics,
                 config_fingerprint: str, curve: RouterCurve | None = None):
        self.bind_address = bind_address
        self.bus_config = bus_config
        self.pool = pool
        self.metrics = metrics
        self.config_fingerprint = config_fingerprint
        self.curve = curve
        self._zap: ZapAuthenticator | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        # (reason, peer, key prefix) -> when it was last logged.
        self._refusals_logged: dict[tuple[str, str, str], float] = {}
        # (worker_id, fingerprint) pairs already refused: logged and counted once, answered every time.
        self._refused: set[tuple[str, str]] = set()
        self.ctx = zmq.asyncio.Context()
        self.socket: zmq.asyncio.Socket | None = None
        self.pending: dict[str, _PendingJob] = {}
        self.events: BusEvents | None = None
        self._tasks: list[asyncio.Task] = []

    def attach(self, events: BusEvents) -> None:
        """Report workers coming, going and offering slots to `events` (before `start`)."""
        self.events = events

    def _workers_changed(self) -> None:
        if self.events is not None:
            self.events.workers_changed()

    async def start(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.bus_config.max_message_bytes)
        # Sending to an unknown identity raises instead of vanishing silently.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A second connection under an identity that is connected already is refused (ZeroMQ's
        # default, said out loud): with hand-over, anyone holding an allowed key could take a live
        # worker's id and flap it out of rotation. A worker that restarts is not locked out: its
        # old connection closes with its process, and ZeroMQ's own heartbeats close a connection
        # whose peer vanished without a word (host lost) within the peer timeout.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(self.bus_config.heartbeat_interval_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.bus_config.peer_timeout_s * 1000))
        if self.curve is not None:
            # The ZAP handler first: a CURVE socket with no handler bound lets every key in.
            self._zap = ZapAuthenticator(self.ctx, AllowList(self.curve.allow_dir), self._handshake_refused)
            self._zap.start()
            configure_server(sock, self.curve)
        # Handshakes that fail before ZAP is asked (no CURVE, wrong router key) show only here.
        self._monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        sock.bind(self.bind_address)
        self.socket = sock
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="bus-recv"),
            asyncio.create_task(self._liveness_loop(), name="bus-liveness"),
            asyncio.create_task(self._monitor_loop(), name="bus-monitor"),
        ]
        if self.curve is not None:
            logger.info("bus bound at %s with CURVE (router key %s..., allow-list %s) (stage config %s)",
                        self.bind_address, self.curve.keypair.prefix, self.curve.allow_dir, self.config_fingerprint)
        else:
            logger.info("bus bound at %s (stage config %s)", self.bind_address, self.config_fingerprint)
        if self.curve is None and not is_local_bind(self.bind_address):
            logger.warning("the bus at %s is reachable from other machines and is neither authenticated nor "
                           "encrypted: anyone who can reach it can register as a worker and see prompts and "
                           "images; keep it on a trusted network or turn on CURVE (--curve-secret-key and "
                           "--curve-allow-dir, see docs/bus_security.md)", self.bind_address)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in self.pending.values():
            if not job.future.done():
                job.future.set_exception(WorkerLost("router shutting down"))
        if self._zap is not None:
            await self._zap.close()
        if self.socket is not None:
            if self._monitor is not None:
                self.socket.disable_monitor()
                self._monitor.close(linger=0)
            self.socket.close(linger=0)
        self.ctx.term()

    async def submit(self, worker: WorkerState, job: JobRequest,
                     on_progress: Callable[[JobProgress], None] | None = None) -> asyncio.Future:
        """Send a job to a worker; the future resolves to its JobResult / JobError or WorkerLost.
        The worker's JobProgress messages for the job go to `on_progress` until then."""
        future = asyncio.get_running_loop().create_future()
        self.pending[job.job_id] = _PendingJob(future, worker.info.worker_id, on_progress)
        await self._send(worker.identity, job)  # if unreachable, _send failed the job already
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
        if not pending.future.done():
            if cancel:
                pending.future.cancel()  # nobody awaits it any more; an exception would be "never retrieved"
            elif exception is not None:
                pending.future.set_exception(exception)
            else:
                pending.future.set_result(result)

    def decline_offer(self, worker: WorkerState) -> None:
        """Tell `worker` this router has no job for the slot it offered."""
        self._spawn(self._send(worker.identity, OfferDeclined()))

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
            if exc.errno == zmq.EHOSTUNREACH:
                self._drop_unreachable(identity)
            return False

    def _drop_unreachable(self, identity: bytes) -> None:
        """The worker's connection is gone (ROUTER_MANDATORY said so): forget it and fail its jobs
        now, rather than after `peer_timeout_s` of silence, or a retry could pick it again. A live
        worker re-registers with its next heartbeat."""
        worker = next((w for w in self.pool.workers.values() if w.identity == identity), None)
        if worker is None:
            return
        logger.warning("worker %s (%s) unreachable: dropped until it heartbeats again",
                       worker.info.worker_id, worker.info.stage.value)
        self._fail_worker_jobs(worker.info.worker_id, "was unreachable")
        self.pool.remove(worker.info.worker_id, reason="unreachable")
        self._workers_changed()

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
            if message.info.config_fingerprint != self.config_fingerprint:
                self._refuse(identity, message.info)
                return
            known = self.pool.workers.get(message.info.worker_id)
            if known is not None and (known.info.pid, known.info.host) != (message.info.pid, message.info.host):
                # Restarted under the same id before it was declared dead: its jobs died with the old process.
                logger.warning("worker %s restarted (pid %d -> %d)", known.info.worker_id, known.info.pid, message.info.pid)
                self._fail_worker_jobs(known.info.worker_id, "restarted")
                self.pool.remove(known.info.worker_id, reason="restarted")
            if self.pool.observe(identity, message):
                info = message.info
                logger.info("worker %s registered: stage=%s capacity=%d host=%s", info.worker_id, info.stage.value, info.capacity, info.host)
                self._spawn(self._send(identity, RouterPing()))
            self._workers_changed()
        elif isinstance(message, SlotOffer):
            state = self.pool.workers.get(message.worker_id)
            if state is not None and state.identity == identity and self.events is not None:
                self.events.slot_offered(message.worker_id)
        elif isinstance(message, Goodbye):
            state = self.pool.workers.get(message.worker_id)
            if state is not None and state.identity == identity:
                logger.info("worker %s deregistered", message.worker_id)
                self._fail_worker_jobs(message.worker_id, "left")
                self.pool.remove(message.worker_id, reason="left")
                self._workers_changed()
        elif isinstance(message, (JobResult, JobError, JobProgress)):
            pending = self.pending.get(message.job_id)
            if pending is None or pending.worker_id != message.worker_id or message.worker_id.encode() != identity:
                if not isinstance(message, JobProgress):  # progress racing a finished job is normal
                    logger.info("dropping late or duplicate reply for job %s from %s", message.job_id, message.worker_id)
                return
            if isinstance(message, JobProgress):
                if pending.on_progress is not None:
                    pending.on_progress(message)
                return
            self._finish(message.job_id, result=message)
        else:
            logger.warning("dropping unexpected %s from %r", type(message).__name__, identity[:64])

    def _refuse(self, identity: bytes, info: WorkerInfo) -> None:
        reason = (f"worker {info.worker_id} runs stage config {info.config_fingerprint} but this router runs "
                  f"{self.config_fingerprint}: start it with the router's --stage-config")
        if (info.worker_id, info.config_fingerprint) not in self._refused:
            self._refused.add((info.worker_id, info.config_fingerprint))
            logger.error("refusing %s worker %s from %s: %s", info.stage.value, info.worker_id, info.host, reason)
            self.metrics.workers_refused.labels(reason="config_mismatch").inc()
        self._spawn(self._send(identity, RegistrationRefused(reason=reason)))

    def _handshake_refused(self, reason: str, peer: str, key_prefix: str) -> None:
        """A peer's bus handshake was refused: count it every time, log it at most once a minute."""
        self.metrics.workers_refused.labels(reason=reason).inc()
        now = time.monotonic()
        key = (reason, peer, key_prefix)
        last = self._refusals_logged.get(key)
        if last is not None and now - last < _REFUSAL_LOG_EVERY_S:
            return
        if len(self._refusals_logged) > 1000:  # a peer cycling keys must not grow this for ever
            self._refusals_logged = {k: t for k, t in self._refusals_logged.items() if now - t < _REFUSAL_LOG_EVERY_S}
        self._refusals_logged[key] = now
        what = {
            REFUSED_UNKNOWN_KEY: "its CURVE public key is not in the allow-list "
                                 f"{self.curve.allow_dir if self.curve else ''} (add its .key file there to admit it)",
            REFUSED_NO_KEY: "it does not use CURVE (start it with --curve-router-key and --curve-secret-key)",
            REFUSED_BAD_HANDSHAKE: "its CURVE handshake failed (does it use this router's public key?)",
            REFUSED_UNEXPECTED_CURVE: "it uses CURVE but this router does not (start the router with "
                                      "--curve-secret-key and --curve-allow-dir, or the worker without keys)",
        }.get(reason, reason)
        logger.warning("bus refused a connection from %s%s: %s [%s]", peer,
                       f" with key {key_prefix}..." if key_prefix else "", what, reason)

    async def _monitor_loop(self) -> None:
        """Count handshakes that fail before ZAP: a plaintext worker at a CURVE router (or the
        reverse), or one that encrypts for another router key. libzmq's event names the bound
        endpoint here, not the peer, so these log the endpoint."""
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            endpoint = event["endpoint"]
            peer = f"a peer at {endpoint.decode(errors='replace') if isinstance(endpoint, bytes) else endpoint}"
            if event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                self._handshake_refused(REFUSED_NO_KEY if self.curve is not None else REFUSED_UNEXPECTED_CURVE, peer, "")
            elif self.curve is not None:
                self._handshake_refused(REFUSED_BAD_HANDSHAKE, peer, "")

    def _fail_worker_jobs(self, worker_id: str, why: str) -> None:
        for job_id in [j for j, p in self.pending.items() if p.worker_id == worker_id]:
            self._finish(job_id, exception=WorkerLost(f"worker {worker_id} {why} while running the job"))

    async def _liveness_loop(self) -> None:
        ping = RouterPing()
        while True:
            dead_workers = self.pool.expire()
            for dead in dead_workers:
                silent = time.monotonic() - dead.last_seen
                logger.warning("worker %s (%s) silent for %.1fs: marked dead", dead.info.worker_id, dead.info.stage.value, silent)
                self._fail_worker_jobs(dead.info.worker_id, "died")
            if dead_workers:
                self._workers_changed()
            for worker in list(self.pool.workers.values()):
                await self._send(worker.identity, ping)
            await asyncio.sleep(self.bus_config.heartbeat_interval_s)
