"""The worker side of the bus, shared by the AR and DiT workers.

A worker connects a DEALER socket to each router it is given (routers bind),
announces itself with heartbeats that carry its full registration, runs up to
`capacity` jobs at once, answers each with a result or a typed error, and
honours cancels and deadlines.

The worker is the one place that knows its slots, so it arbitrates between the
routers that share it: a job beyond capacity is refused (OVERLOADED) and its
router is put in line; a freed slot is held for the router first in line and
offered to it (SlotOffer), which answers with a job or OfferDeclined. So no
slot is ever oversubscribed, a refused router waits instead of spinning, and
routers are served in the order they were refused (docs/scheduling.md). A router that goes silent is reconnected to
with a fresh socket; since every heartbeat re-registers, a restarted router
finds its workers again with no manual step.

A router given by DNS name is every address the name resolves to (say the pods
of a Kubernetes headless Service), re-resolved periodically: replicas that
appear get a link, replicas that leave have theirs retired. With CURVE keys
(common/bus_security.py) every link is encrypted and authenticated.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from common.protocol import (
    ErrorCode,
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
    ResultPayload,
    RouterPing,
    SlotOffer,
    WorkerInfo,
    decode,
    encode,
)
from common.bus_security import WorkerCurve, configure_client, key_prefix
from common.metrics import WorkerMetrics
from common.slot_arbiter import SlotArbiter
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


@dataclass(frozen=True)
class RouterTarget:
    """One `--router` value: a ZeroMQ address whose host may be a DNS name.

    A name (say a Kubernetes headless Service) may resolve to several router replicas: the
    worker connects to each address and re-resolves every `router_resolve_interval_s`. IP
    literals, `ipc://` and `inproc://` addresses are used as they are."""

    spec: str
    host: str | None = None  # a DNS name to resolve; None when `spec` is used as it is
    port: int | None = None

    @classmethod
    def parse(cls, spec: str) -> "RouterTarget":
        """Validate one address; ValueError says what is wrong with it."""
        spec = spec.strip()
        scheme, sep, rest = spec.partition("://")
        if not sep or not rest:
            raise ValueError(f"router address {spec!r}: expected tcp://HOST:PORT (or ipc://PATH)")
        if scheme in ("ipc", "inproc"):
            return cls(spec)
        if scheme != "tcp":
            raise ValueError(f"router address {spec!r}: the scheme must be tcp, ipc or inproc")
        host, colon, port = rest.rpartition(":")
        if not colon or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"router address {spec!r}: expected tcp://HOST:PORT with a port in 1..65535")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not host or host == "*" or any(c.isspace() or c in "/@?#[]" for c in host):
            raise ValueError(f"router address {spec!r}: expected tcp://HOST:PORT (a router's host name or address)")
        if _is_ip(host):
            return cls(_tcp_address(host, int(port)))
        return cls(spec, host=host, port=int(port))

    async def resolve(self) -> list[str]:
        """The concrete addresses to connect to now (the system resolver, off the event loop).

        Only one address family is used, IPv4 when there is any: in a dual-stack cluster a pod
        has both, and two links to one router with the same identity would steal it from each other."""
        if self.host is None:
            return [self.spec]
        infos = await _getaddrinfo(self.host, self.port)
        v4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
        v6 = [info[4][0] for info in infos if info[0] == socket.AF_INET6]
        return sorted({_tcp_address(ip, self.port) for ip in v4 or v6})


async def _getaddrinfo(host: str, port: int) -> list:
    """`socket.getaddrinfo` in a daemon thread of its own. Not the loop's default executor: a lookup
    stuck on a slow DNS server (seconds per try) would hold up the worker's exit, since the loop's
    shutdown waits for every thread of that executor; an abandoned daemon thread holds up nothing."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome: list | BaseException) -> None:
        if not future.done():
            future.set_exception(outcome) if isinstance(outcome, BaseException) else future.set_result(outcome)

    def lookup() -> None:
        try:
            outcome = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the awaiting task
            outcome = exc
        try:
            loop.call_soon_threadsafe(settle, outcome)
        except RuntimeError:  # the loop closed meanwhile: nobody waits for the answer
            pass

    threading.Thread(target=lookup, name=f"resolve:{host}", daemon=True).start()
    return await future


def parse_router_targets(specs: list[str]) -> list[RouterTarget]:
    """`--router` values (each may be a comma list) as targets; ValueError names a bad one."""
    targets = [RouterTarget.parse(part) for spec in specs for part in spec.split(",") if part.strip()]
    if not targets:
        raise ValueError("no router address given: pass --router tcp://HOST:PORT")
    return list({t.spec: t for t in targets}.values())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def _tcp_address(ip: str, port: int) -> str:
    return f"tcp://[{ip}]:{port}" if ":" in ip else f"tcp://{ip}:{port}"


# What the worker watches on each connection: how its handshake with the router went.
_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class _RouterLink:
    """One DEALER connection to one router address, and the tasks that serve it."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str, identity: bytes, bus_config: BusConfig,
                 curve: WorkerCurve | None = None):
        self.ctx, self.address, self.identity, self.bus_config, self.curve = ctx, address, identity, bus_config, curve
        self.last_router_ping = time.monotonic()
        # When the router last sent something only a registered worker gets (a RouterPing or a job);
        # None until it has, and again after a reconnect.
        self.last_accepted: float | None = None
        self.refused_because: str | None = None
        # Why the bus handshake fails, until one succeeds; each problem is logged once.
        self.handshake_problem: str | None = None
        self._problems_logged: set[str] = set()
        self._bare_failures = 0  # handshakes that failed without a reason in a row
        self._send_problem: str | None = None  # why sends fail, logged once until one succeeds
        # The address left DNS: no new jobs from this router, the link closes once its jobs are done.
        self.retiring = False
        self.tasks: list[asyncio.Task] = []
        self.socket, self.monitor = self._connect()

    @property
    def registered(self) -> bool:
        """The router has accepted this worker and was heard from within the peer timeout."""
        return (self.refused_because is None and not self.retiring and self.last_accepted is not None
                and time.monotonic() - self.last_accepted <= self.bus_config.peer_timeout_s)

    def _connect(self) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.bus_config.max_message_bytes)
        # Don't pile up heartbeats for a router that is gone; they are resent anyway.
        sock.setsockopt(zmq.SNDHWM, 1000)
        if self.address.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        if self.curve is not None:
            configure_client(sock, self.curve)
        monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        sock.connect(self.address)
        return sock, monitor

    def reconnect(self) -> None:
        self.close(linger_ms=0)
        self.socket, self.monitor = self._connect()
        self.last_router_ping = time.monotonic()
        self.last_accepted = None

    def close(self, linger_ms: int) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=linger_ms)

    def on_handshake_event(self, event: dict) -> None:
        """Log a failing handshake once (until one succeeds): without this a worker whose key the
        router refuses would wait silently, its connection retried by ZeroMQ every 0.1 s."""
        kind, value = event["event"], event["value"]
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self.handshake_problem is not None:
                logger.info("bus handshake with router %s succeeded%s", self.address, " (CURVE)" if self.curve else "")
            self.handshake_problem, self._bare_failures = None, 0
            self._problems_logged.clear()
            return
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            # Also the first sign of a refusal that the next event explains, or a router that went
            # away mid-handshake: only a run of them with no explanation says something.
            self._bare_failures += 1
            if self._problems_logged or self._bare_failures < 3:
                return
        key = f"key {key_prefix(self.curve.keypair.public)}..." if self.curve else ""
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            problem = (f"router {self.address} refused this worker's CURVE {key} (status {value}): its public key is "
                       "not in the router's allow-list (--curve-allow-dir); the worker keeps retrying")
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            problem = (f"router {self.address} does not use CURVE but this worker does: drop --curve-router-key and "
                       "--curve-secret-key, or start the router with CURVE" if self.curve else
                       f"router {self.address} requires CURVE: start this worker with --curve-router-key and "
                       "--curve-secret-key (GLM_CURVE_ROUTER_KEY, GLM_CURVE_SECRET_KEY)")
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            problem = f"bus handshake with router {self.address} failed: protocol error {value:#x}"
        else:
            problem = (f"bus handshake with router {self.address} keeps failing ({os.strerror(value)}): "
                       + ("is --curve-router-key that router's public key?" if self.curve else "is it a glm-image-serve router?"))
        if problem not in self._problems_logged:
            self._problems_logged.add(problem)
            logger.error("%s", problem)
        self.handshake_problem = problem

    async def send(self, message) -> None:
        try:
            await self.socket.send_multipart(encode(message), copy=False)
        except zmq.ZMQError as exc:
            logger.warning("send to router %s failed: %s", self.address, exc)

    def send_nowait(self, message) -> None:
        """Send now or drop (for progress, which the next message supersedes)."""
        kind = type(message).__name__
        try:
            sent = self.socket.send_multipart(encode(message), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            self._send_failed(exc, kind)
            return
        # zmq.asyncio reports even a non-blocking send's failure on the Future it returns, not by raising:
        # read it, or each dropped message (a heartbeat a second on a refused link) logs a "Future
        # exception was never retrieved" traceback.
        sent.add_done_callback(lambda future: self._send_done(future, kind))

    def _send_done(self, future: asyncio.Future, kind: str) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self._send_problem = None
        else:
            self._send_failed(exc, kind)

    def _send_failed(self, exc: BaseException, kind: str) -> None:
        """A dropped message: EAGAIN (no connection or a full queue: the handshake problem, or the
        router's silence, is logged where it is found) at debug level, anything else once."""
        if isinstance(exc, zmq.Again):
            logger.debug("router %s is not reading: dropped a %s", self.address, kind)
            return
        problem = f"{type(exc).__name__}: {exc}"
        if problem != self._send_problem:
            self._send_problem = problem
            logger.warning("send to router %s failed (%s); the same failure is not logged again until a send "
                           "succeeds", self.address, problem)


class StageWorker:
    """Runs a stage handler behind the bus until stopped or drained.

    `router_addresses` are `--router` values; a DNS name among them is resolved (and re-resolved
    every `bus.router_resolve_interval_s`) to every router replica behind it, one link each. With
    `curve`, every connection is a CURVE client of the router key it holds."""

    def __init__(
        self,
        info: WorkerInfo,
        router_addresses: list[str],
        handler: StageHandler,
        bus_config: BusConfig,
        metrics: WorkerMetrics,
        curve: WorkerCurve | None = None,
    ):
        self.info = info
        self.metrics = metrics
        self.handler = handler
        self.bus_config = bus_config
        self.router_addresses = router_addresses
        self.targets = parse_router_targets(router_addresses)
        self.curve = curve
        self.ctx = zmq.asyncio.Context()
        # Replaced, never mutated, when links come and go: `ready` reads it from other threads.
        self.links: list[_RouterLink] = []
        self.jobs: dict[str, _RunningJob] = {}
        # The slots, shared by every router (common/slot_arbiter.py), and the timers of the offers out.
        self.slots: SlotArbiter[_RouterLink] = SlotArbiter(info.capacity)
        self._offer_lapses: dict[_RouterLink, asyncio.TimerHandle] = {}
        # Running average of successful job times, announced in heartbeats (routers estimate waits with it).
        self.recent_job_s: float | None = None
        self.draining = False
        self._stopped = asyncio.Event()
        self._refusal: WorkerRefused | None = None
        self._tasks: list[asyncio.Task] = []
        # Each target's addresses as last resolved (kept through a failed resolution).
        self._resolved: dict[str, list[str]] = {}
        self._resolve_failing: set[str] = set()

    async def serve(self) -> None:
        """Connect, heartbeat and serve jobs until `stop()` or a finished `drain()`.

        Raises WorkerRefused when every router refused the registration."""
        logger.info("worker %s (%s) serving routers %s%s", self.info.worker_id, self.info.stage.value,
                    ", ".join(t.spec for t in self.targets),
                    f" with CURVE (key {self.curve.keypair.prefix}...)" if self.curve else "")
        self._tasks.append(asyncio.create_task(self._discovery_loop(), name="router-discovery"))
        try:
            await self._stopped.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for link in self.links:
                await self._stop_link_tasks(link)
            await self._cancel_all_jobs()
            for lapse in self._offer_lapses.values():
                lapse.cancel()
            self._offer_lapses.clear()
            for link in self.links:
                # After a drain the last results and the Goodbye may still sit in the queue: let them out,
                # to a router that has this worker registered. Anything queued for a router that refused
                # the handshake or is gone can never leave, and a linger would only hold up the exit.
                link.close(linger_ms=_DRAIN_LINGER_MS if self.draining and link.registered else 0)
            self.ctx.term()
        if self._refusal is not None:
            raise self._refusal

    @property
    def ready(self) -> bool:
        """True while at least one router has this worker registered: that router accepted it (the
        router pings and sends jobs only to workers it registered; a refused worker hears only
        RegistrationRefused, and one whose CURVE key it refuses hears nothing) and was heard from
        within `peer_timeout_s`. False while draining, since routers send a draining worker no new
        work. Safe to read from another thread."""
        return not self.draining and any(link.registered for link in self.links)

    def stop(self) -> None:
        self._stopped.set()

    async def drain(self, grace_s: float) -> None:
        """Stop taking work, let in-flight jobs finish (up to `grace_s`), deregister, stop."""
        self.draining = True
        logger.info("draining: %d job(s) in flight, grace %.1fs", len(self.jobs), grace_s)
        # Never blocking sends: a link whose handshake was refused has no connection to queue on.
        for link in self.links:
            link.send_nowait(self._heartbeat(link))
        pending = [j.task for j in self.jobs.values()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            if late:
                logger.warning("grace period over: cancelling %d job(s)", len(late))
        await self._cancel_all_jobs()
        for link in self.links:
            link.send_nowait(Goodbye(worker_id=self.info.worker_id))
        self.stop()

    def _heartbeat(self, link: _RouterLink) -> Heartbeat:
        return Heartbeat(info=self.info, draining=self.draining or link.retiring,
                         running_elsewhere=sum(1 for job in self.jobs.values() if job.link is not link),
                         free_slots=self.slots.free_for(link), job_seconds=self.recent_job_s,
                         loaded_loras=self._loaded_loras())

    # -- slots shared by several routers --------------------------------------------------------

    def _loaded_loras(self) -> list[str]:
        loaded = getattr(self.handler, "loaded_loras", None)  # a DiT handler's adapters, by digest
        return loaded() if loaded is not None else []

    def _offer_free_slots(self) -> None:
        """Hold each free slot for the router refused longest ago, and tell it (SlotOffer)."""
        while not self._stopped.is_set() and (offers := self.slots.next_offers()):
            for link in offers:
                if link not in self.links or link.retiring or self.draining:
                    self.slots.release(link)  # gone meanwhile: the next in line gets the slot
                    continue
                lapse = asyncio.get_running_loop().call_later(self.bus_config.heartbeat_interval_s,
                                                              self._offer_ended, link)
                self._offer_lapses[link] = lapse
                link.send_nowait(SlotOffer(worker_id=self.info.worker_id))

    def _offer_ended(self, link: _RouterLink) -> None:
        """The router declined its offer, or did not answer in time: the slot goes to the next."""
        lapse = self._offer_lapses.pop(link, None)
        if lapse is not None:
            lapse.cancel()
        self.slots.release(link)
        self._offer_free_slots()

    def _forget_link_slots(self, link: _RouterLink) -> None:
        lapse = self._offer_lapses.pop(link, None)
        if lapse is not None:
            lapse.cancel()
        self.slots.forget(link)
        self._offer_free_slots()

    # -- router discovery ---------------------------------------------------------------------

    async def _discovery_loop(self) -> None:
        """Resolve every target, then keep one link per address: new addresses get a link, links
        whose address left DNS retire. A failed resolution keeps that target's links (a DNS blip
        must not cut every router off); until a target first resolves it is retried every second."""
        interval = self.bus_config.router_resolve_interval_s
        while True:
            for target in self.targets:
                await self._resolve(target)
            await self._sync_links()
            unresolved = any(t.spec not in self._resolved for t in self.targets)
            await asyncio.sleep(min(interval, 1.0) if unresolved else interval)

    async def _resolve(self, target: RouterTarget) -> None:
        try:
            addresses = await target.resolve()
            if not addresses:
                raise OSError("no address")
        except OSError as exc:  # socket.gaierror included
            if target.spec not in self._resolve_failing:
                self._resolve_failing.add(target.spec)
                if target.spec in self._resolved:
                    logger.warning("cannot resolve router %s (%s): keeping its %d known address(es) and retrying",
                                   target.spec, exc, len(self._resolved[target.spec]))
                else:
                    logger.warning("router %s does not resolve yet (%s): retrying until it does", target.spec, exc)
            return
        previous = self._resolved.get(target.spec)
        if target.spec in self._resolve_failing:
            self._resolve_failing.discard(target.spec)
            if previous is not None:
                logger.info("router %s resolves again", target.spec)
        if target.host is not None and addresses != previous:
            logger.info("router %s resolves to %s", target.spec, ", ".join(addresses))
        self._resolved[target.spec] = addresses

    async def _sync_links(self) -> None:
        wanted = {address for addresses in self._resolved.values() for address in addresses}
        links = {link.address: link for link in self.links}
        identity = self.info.worker_id.encode()
        added = []
        for address in sorted(wanted - links.keys()):
            link = _RouterLink(self.ctx, address, identity, self.bus_config, self.curve)
            link.tasks = [
                asyncio.create_task(self._receive_loop(link), name=f"recv:{address}"),
                asyncio.create_task(self._heartbeat_loop(link), name=f"hb:{address}"),
                asyncio.create_task(self._monitor_loop(link), name=f"monitor:{address}"),
            ]
            added.append(link)
            logger.info("connecting to router %s", address)
        for address, link in links.items():
            if address in wanted and link.retiring:
                logger.info("router %s is back in DNS: taking jobs from it again", address)
                link.retiring = False
            elif address not in wanted and not link.retiring:
                # Gently: a router replica scaled down still finishes its in-flight requests.
                running = self._jobs_of(link)
                logger.warning("router %s left DNS: %s", address,
                               f"telling it this worker is draining; the link closes once its {running} job(s) are done"
                               if running else "closing the link")
                link.retiring = True
                link.send_nowait(self._heartbeat(link))
        done = [link for link in links.values() if link.retiring and self._jobs_of(link) == 0]
        self.links = [link for link in self.links if link not in done] + added
        for link in done:
            await self._drop_link(link, "left DNS")

    def _jobs_of(self, link: _RouterLink) -> int:
        return sum(1 for j in self.jobs.values() if j.link is link)

    async def _drop_link(self, link: _RouterLink, why: str) -> None:
        """Close a link that is out of `self.links`: its tasks, its jobs (their router re-dispatches
        them), a Goodbye so a live router forgets this worker at once, then the socket."""
        logger.info("dropping router %s (%s)", link.address, why)
        await self._stop_link_tasks(link)
        await self._cancel_jobs_of(link)
        self._forget_link_slots(link)
        link.send_nowait(Goodbye(worker_id=self.info.worker_id))
        link.close(linger_ms=500)

    @staticmethod
    async def _stop_link_tasks(link: _RouterLink) -> None:
        for task in link.tasks:
            task.cancel()
        await asyncio.gather(*link.tasks, return_exceptions=True)

    # -- per link -----------------------------------------------------------------------------

    async def _heartbeat_loop(self, link: _RouterLink) -> None:
        while True:
            # Never blocks: after a refused handshake ZeroMQ drops the connection for good (no
            # queue to wait on); the reconnect below retries it every peer timeout.
            link.send_nowait(self._heartbeat(link))
            if time.monotonic() - link.last_router_ping > self.bus_config.peer_timeout_s:
                if link.handshake_problem is None:
                    logger.warning("router %s silent for %.1fs: reconnecting", link.address, self.bus_config.peer_timeout_s)
                else:  # already logged once
                    logger.debug("retrying the handshake with router %s", link.address)
                # Jobs from the lost router can't be answered; their router re-dispatches them.
                await self._cancel_jobs_of(link)
                self._forget_link_slots(link)
                link.reconnect()
            await asyncio.sleep(self.bus_config.heartbeat_interval_s)

    async def _monitor_loop(self, link: _RouterLink) -> None:
        while True:
            monitor = link.monitor
            try:
                frames = await monitor.recv_multipart()
            except (zmq.ZMQError, asyncio.CancelledError):
                # reconnect() replaced the monitor socket: go on with the new one.
                if monitor is not link.monitor and not asyncio.current_task().cancelling():
                    continue
                raise
            try:
                link.on_handshake_event(parse_monitor_message(frames))
            except Exception:  # a monitor message we cannot read must not end the loop
                logger.exception("unreadable socket monitor event from router %s", link.address)

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
            if isinstance(message, RegistrationRefused):
                self._on_refused(link, message.reason)
                continue
            if isinstance(message, (RouterPing, JobRequest, JobCancel, OfferDeclined)):
                if link.refused_because is not None:
                    logger.info("router %s now accepts this worker", link.address)
                link.refused_because = None  # e.g. that router restarted with this worker's config
                link.last_accepted = link.last_router_ping
            if isinstance(message, RouterPing):
                continue
            if isinstance(message, OfferDeclined):
                self._offer_ended(link)
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
        lapse = self._offer_lapses.pop(link, None)  # a job answers this router's offer, if it had one
        if lapse is not None:
            lapse.cancel()
        draining = self.draining or link.retiring
        if draining or not self.slots.try_start(link):
            if draining:
                self.slots.forget(link)
            self.metrics.job_finished(ErrorCode.OVERLOADED.value)
            reason = "draining" if draining else f"at capacity ({self.info.capacity}): you are in line for a slot"
            await link.send(JobError(job_id=job.job_id, worker_id=self.info.worker_id, code=ErrorCode.OVERLOADED,
                                     message=f"worker {reason}"))
            self._offer_free_slots()  # a slot this router's offer held goes to the next in line
            return
        logger.info("[%s] job %s started", job.log_tag, job.job_id)
        task = asyncio.create_task(self._run(job, link), name=f"job:{job.job_id}")
        self.jobs[job.job_id] = _RunningJob(job, task, link)
        task.add_done_callback(lambda _t, jid=job.job_id: self._job_done(jid))

    def _job_done(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self.slots.finish()
        self._offer_free_slots()

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
        if isinstance(reply, JobResult):
            took = time.monotonic() - started
            self.recent_job_s = took if self.recent_job_s is None else 0.7 * self.recent_job_s + 0.3 * took
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
