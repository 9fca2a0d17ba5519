"""The worker process entry shared by both stages: metrics and probes, model load, registration, serve, drain."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from common import defaults
from common.bus_security import WorkerCurve
from common.metrics import MetricsServer, WorkerMetrics, WorkerProbes
from common.protocol import Stage, WorkerInfo
from common.stage_config import StageConfig
from common.worker_runtime import StageHandler, StageWorker, parse_router_targets, run_stage_worker

logger = logging.getLogger(__name__)

# Bind addresses that mean "every interface": not an address anyone can scrape.
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "*"}


@dataclass(frozen=True)
class WorkerOptions:
    """How one worker process was asked to run (from the command line)."""

    model_path: str
    config: StageConfig
    routers: list[str]
    worker_id: str | None = None
    device: str = "cpu"
    metrics_port: int | None = None
    metrics_host: str = defaults.LOCAL_HOST  # the metrics port is this machine's only unless asked otherwise
    # "host:port" announced to the routers as where to scrape this worker; None: derived (metrics_advertise_address).
    metrics_advertise: str | None = None
    drain_grace_s: float = defaults.SHUTDOWN_GRACE_S
    curve: WorkerCurve | None = None  # CURVE keys for the bus; None: plaintext


def parse_advertise(value: str, default_port: int) -> str:
    """`HOST[:PORT]` (an IPv6 host in brackets) as "host:port", the port defaulting to `default_port`.

    Raises ValueError saying what is wrong, for the command line to show."""
    value = value.strip()
    host, port = value, None
    if value.startswith("["):
        host, closed, rest = value[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(f"--metrics-advertise {value!r}: write an IPv6 address as [ADDR] or [ADDR]:PORT")
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif value.count(":") > 1:
        raise ValueError(f"--metrics-advertise {value!r}: write an IPv6 address as [ADDR] or [ADDR]:PORT")
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise ValueError(f"--metrics-advertise {value!r}: expected HOST[:PORT], e.g. 10.0.0.7:9100")
    if port is None:
        number = default_port
    elif port.isdigit() and 0 < int(port) < 65536:
        number = int(port)
    else:
        raise ValueError(f"--metrics-advertise {value!r}: the port must be a number in 1..65535")
    return _join_host_port(host, number)


def metrics_advertise_address(metrics_host: str, metrics_port: int, routers: list[str]) -> str:
    """Where to tell Prometheus to scrape when --metrics-advertise is not given.

    The bind host when it is a concrete address; for a wildcard bind (0.0.0.0, ::), the local
    address the OS would send from towards the first router (a UDP connect: no packet leaves), so
    a Prometheus next to the router reaches it; failing that, this host name's address. `routers`
    are --router values, each possibly a comma list. An address on loopback announced to a router
    on another machine is logged as a warning (`loopback_advertise_warning`)."""
    address = _derived_advertise_address(metrics_host, metrics_port, _router_hosts(routers))
    warning = loopback_advertise_warning(address, routers)
    if warning is not None:
        logger.warning("%s", warning)
    return address


def _router_hosts(routers: list[str]) -> list[tuple[str, int]]:
    """(host, port) of every tcp:// router among `routers` (--router values: repeated, comma lists or both)."""
    try:
        targets = parse_router_targets(routers)
    except ValueError:  # the command line checked them; nothing usable here means no router to look at
        return []
    hosts = []
    for target in targets:
        if target.host is not None:
            hosts.append((target.host, target.port))
            continue
        parsed = urlsplit(target.spec)  # an IP literal, or ipc:// / inproc:// (no host: on this machine)
        if parsed.scheme == "tcp" and parsed.hostname:
            hosts.append((parsed.hostname, parsed.port or defaults.BUS_PORT))
    return hosts


def _derived_advertise_address(metrics_host: str, metrics_port: int, routers: list[tuple[str, int]]) -> str:
    if metrics_host not in _WILDCARD_HOSTS:
        return _join_host_port(metrics_host, metrics_port)
    for host, port in routers:
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect(sockaddr)
                return _join_host_port(probe.getsockname()[0], metrics_port)
        except (OSError, ValueError):
            continue  # not resolvable yet (a router pod still starting): try the next, then the host name
    try:
        return _join_host_port(socket.gethostbyname(socket.gethostname()), metrics_port)
    except OSError:
        return _join_host_port(socket.gethostname(), metrics_port)


def loopback_advertise_warning(address: str, routers: list[str]) -> str | None:
    """Why announcing `address` ("host:port") to `routers` (--router values) will not work, or None.

    A loopback address (127.0.0.1, ::1, localhost) is only reachable on this machine: a router on
    another machine lists it at /metrics/targets and its Prometheus scrapes itself, not this worker."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if not _is_loopback(host):
        return None
    remote = [_join_host_port(h, p) for h, p in _router_hosts(routers) if not _is_loopback(h)]
    if not remote:
        return None
    return (f"this worker announces its metrics at {address}, a loopback address, to router(s) on another machine "
            f"({', '.join(remote)}): a Prometheus there cannot scrape it. Pass --metrics-advertise HOST[:PORT] "
            "(env GLM_METRICS_ADVERTISE) with an address that Prometheus reaches, and --metrics-host 0.0.0.0 (or "
            "that address) so that the metrics port listens there")


def _is_loopback(host: str) -> bool:
    """`host` (an address or a name) is this machine only; a name counts if it resolves to loopback only."""
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        pass  # a name
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False  # unknown yet (a router pod not started): assume another machine
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%", 1)[0]).is_loopback for info in infos)


def _join_host_port(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass  # a name
    return f"{host}:{port}"


def _not_ready_reason(worker: StageWorker) -> str | None:
    """Why /ready says 503 for a loaded worker, or None. Read from an HTTP thread: reads only."""
    if worker.draining:
        return "draining"
    if not worker.ready:
        return f"not registered with any router yet ({', '.join(worker.router_addresses)})"
    return None


async def serve_stage_worker(
    stage: Stage,
    options: WorkerOptions,
    capacity: int,
    make_handler: Callable[[WorkerMetrics], StageHandler],
) -> None:
    """Serve metrics and probes, load the stage's model (via `make_handler`), then join the bus:
    registration means ready. Serves until SIGINT/SIGTERM, then drains."""
    # A random tail: in a container the PID (often 1) and the host name (the pod's) are the same after
    # a restart, and a router that took the new process for the old one would wait on its lost jobs.
    worker_id = options.worker_id or f"{stage.value}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    metrics = WorkerMetrics(stage.value, worker_id)
    probes = WorkerProbes()
    server: MetricsServer | None = None
    metrics_address = None
    if options.metrics_port:
        # Before the load, so probes answer (503 "loading") while the weights come in.
        server = metrics.serve(options.metrics_port, options.metrics_host, probes)
        metrics_address = options.metrics_advertise or metrics_advertise_address(
            options.metrics_host, options.metrics_port, options.routers)
        logger.info("worker %s announces metrics at %s", worker_id, metrics_address)
    try:
        handler = make_handler(metrics)
        info = WorkerInfo(
            worker_id=worker_id,
            stage=stage,
            model=options.model_path,
            capacity=capacity,
            pid=os.getpid(),
            host=socket.gethostname(),
            config_fingerprint=options.config.fingerprint(),
            metrics_address=metrics_address,
            lora_targets=getattr(handler, "lora_targets", None),
        )
        worker = StageWorker(info, options.routers, handler, options.config.bus, metrics, curve=options.curve)
        probes.loaded(lambda: _not_ready_reason(worker))
        beats = asyncio.create_task(probes.run_beats(), name=f"probe-beats:{worker_id}")
        try:
            await run_stage_worker(worker, options.drain_grace_s)
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
            close = getattr(handler, "close", None)
            if close is not None:
                await close()
    finally:
        if server is not None:
            server.close()
