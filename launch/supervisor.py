"""The launcher's process supervisor: start the router and the stage workers, wait until the
system is ready, keep every process running, and stop them all gracefully.

`glm-image-serve launch` (and so `launch/disagg_glm_image.sh`) runs this. The rules:

- Start-up: every process is started at once; the launch succeeds when the router's `/ready`
  shows the expected number of live workers per stage. A process that exits before that (bad
  model path, bad config, port in use) fails the launch at once: everything is stopped and the
  launcher exits non-zero, naming the process, its exit status and the tail of its log.
- Serving: a process that exits is restarted with the same arguments (worker id, device,
  metrics port) after an exponential backoff. More than `max_restarts` exits within `window_s`
  is a crash loop: that process is left down, loudly, with its log tail, and the rest keeps
  serving (`/ready` tells the truth per stage). The router is the one exception: without it
  nothing is served, so a router crash loop stops the launcher (non-zero) for an outer
  supervisor (systemd, Kubernetes) to act on.
- Stop (SIGINT, SIGTERM, SIGHUP): SIGTERM to the router first (it stops taking requests and
  finishes the ones in flight, which still need the workers), then to the workers (they drain),
  SIGKILL for whatever outlives its grace period; exit 0 when everything exited 0 (a process
  still loading may die of the SIGTERM itself, which is fine too). A second signal kills
  everything at once.

Why not supervisord: it runs as a daemon configured by a file and driven over XML-RPC, so the
launcher would manage a second process tree through a second tool; it has no notion of "fail the
launch if a process dies before the system is ready", nor of readiness that depends on another
process's view (the router's worker table); and its stop order is by priority number, not "wait
for the router to finish in-flight requests before draining the workers". What is needed here
fits in one asyncio loop that the tests exercise directly.

Every child runs in its own session, so a Ctrl-C in the terminal reaches only the supervisor
(which then stops the children in order, once), and its output comes through a pipe: each line
goes to `LOG_DIR/NAME.log` and, prefixed with the process name, to the supervisor's stderr.
Children started here also ask the kernel to SIGTERM them if the supervisor dies (see
`die_with_supervisor` in launch/cli.py), so a SIGKILLed launcher leaves no orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Literal, Mapping, TextIO

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from common import defaults

logger = logging.getLogger(__name__)

# Set in every child's environment to the supervisor's pid; see launch.cli.die_with_supervisor.
SUPERVISOR_PID_ENV = "GLM_SERVE_SUPERVISOR_PID"

Role = Literal["router", "ar", "dit"]


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a process that exited, and when to stop trying."""

    max_restarts: int = defaults.MAX_RESTARTS  # restarts allowed within `window_s`; one more exit is a crash loop
    window_s: float = defaults.RESTART_WINDOW_S
    backoff_initial_s: float = defaults.BACKOFF_INITIAL_S  # wait before the first restart; doubles per recent exit
    backoff_max_s: float = defaults.BACKOFF_MAX_S

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window_s <= 0 or self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"invalid restart policy: {self}")

    def backoff_s(self, recent_exits: int) -> float:
        """The wait before restarting a process that has exited `recent_exits` (>= 1) times in the window."""
        return min(self.backoff_initial_s * 2 ** max(recent_exits - 1, 0), self.backoff_max_s)


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    delay_s: float
    recent_exits: int  # exits within the window, this one included


class CrashHistory:
    """The unexpected exits of one process within the policy's window."""

    def __init__(self, policy: RestartPolicy):
        self.policy = policy
        self._exits: deque[float] = deque()

    def record_exit(self, now: float) -> RestartDecision:
        while self._exits and now - self._exits[0] > self.policy.window_s:
            self._exits.popleft()
        self._exits.append(now)
        recent = len(self._exits)
        if recent > self.policy.max_restarts:
            return RestartDecision(False, 0.0, recent)
        return RestartDecision(True, self.policy.backoff_s(recent), recent)


@dataclass(frozen=True)
class ProcessSpec:
    """One process the supervisor keeps running; restarts reuse exactly this command line."""

    name: str  # log prefix, log file name and metrics label; a worker's --worker-id too
    role: Role
    argv: tuple[str, ...]
    # Set in this process's environment on top of the supervisor's: secrets (API keys) go here,
    # never on the command line, where `ps` shows them to every user.
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LaunchOptions:
    """What `glm-image-serve launch` was asked to run (from its command line)."""

    model: str
    stage_config: str
    model_name: str = defaults.MODEL_NAME
    host: str = defaults.LOCAL_HOST
    port: int = defaults.HTTP_PORT
    bus_port: int = defaults.BUS_PORT
    bus_host: str | None = None  # default: the HTTP host
    num_ar: int = defaults.NUM_AR
    num_dit: int = defaults.NUM_DIT
    ar_devices: tuple[str, ...] = ()  # worker i takes item i mod len; empty: the stage config's
    dit_devices: tuple[str, ...] = ()
    worker_metrics_port: int | None = None  # worker k (AR first, then DiT) gets this + k
    shutdown_grace_s: float = defaults.SHUTDOWN_GRACE_S  # the router's --shutdown-grace and the workers' --drain-grace
    curve_keys: str | None = None  # a `glm-image-serve keygen` folder: CURVE on the bus; None: plaintext
    api_keys: tuple[str, ...] = ()  # the router's API keys (its environment, not its argv)
    api_key_file: str | None = None  # a key file the router reads (and re-reads when it changes)
    protect_metrics: bool = False  # the router's /metrics needs a key too
    lora_dir: str | None = None  # the LoRA adapter folder of the router and the DiT workers; None: the stage config's


@dataclass(frozen=True)
class Deployment:
    """The processes of one launch and how to tell that the system is ready."""

    processes: tuple[ProcessSpec, ...]
    url: str  # where a client on this machine reaches the router
    bus_bind: str
    bus_connect: str
    expected_workers: Mapping[str, int]


def _wildcard(host: str) -> bool:
    return host in ("", "*", "0.0.0.0", "::")


def _url_host(host: str) -> str:
    if _wildcard(host):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def bus_addresses(http_host: str, bus_host: str | None, bus_port: int) -> tuple[str, str]:
    """(bind, connect) ZeroMQ addresses: the bus binds where the HTTP side binds unless told otherwise."""
    host = http_host if bus_host is None else bus_host
    if _wildcard(host):
        return f"tcp://*:{bus_port}", f"tcp://127.0.0.1:{bus_port}"
    address = f"tcp://{_url_host(host)}:{bus_port}"
    return address, address


def plan_deployment(options: LaunchOptions) -> Deployment:
    """The router and worker command lines for `options`."""
    if options.num_ar < 1 or options.num_dit < 1:
        raise ValueError("at least one AR and one DiT worker are needed")
    bus_bind, bus_connect = bus_addresses(options.host, options.bus_host, options.bus_port)
    cli = (sys.executable, "-m", "launch.cli")
    router_argv = cli + (
        "router", "--stage-config", options.stage_config, "--host", options.host, "--port", str(options.port),
        "--bus-bind", bus_bind, "--model-name", options.model_name, "--shutdown-grace", str(options.shutdown_grace_s),
    )
    if options.curve_keys is not None:
        allow_dir = Path(options.curve_keys).absolute() / "allowed_workers"
        if not allow_dir.is_dir():
            raise ValueError(f"--curve-keys {options.curve_keys}: no allowed_workers/ folder; "
                             f"write the keys with `glm-image-serve keygen --out {options.curve_keys}`")
        router_argv += ("--curve-secret-key", str(curve_key_file(options.curve_keys, "router")),
                        "--curve-allow-dir", str(allow_dir))
    if options.api_key_file is not None:
        router_argv += ("--api-key-file", str(Path(options.api_key_file).absolute()))
    if options.protect_metrics:
        router_argv += ("--protect-metrics",)
    lora_argv = ("--lora-dir", str(Path(options.lora_dir).absolute())) if options.lora_dir else ()
    router_argv += lora_argv
    router_env = (("GLM_API_KEY", ",".join(options.api_keys)),) if options.api_keys else ()
    processes = [ProcessSpec("router", "router", router_argv, router_env)]
    index = 0
    for role, count, devices in (("ar", options.num_ar, options.ar_devices), ("dit", options.num_dit, options.dit_devices)):
        for i in range(count):
            name = f"{role}-{i}"
            argv = cli + (
                f"{role}-worker", "--stage-config", options.stage_config, "--router", bus_connect, "--model", options.model,
                "--worker-id", name, "--drain-grace", str(options.shutdown_grace_s),
            )
            if options.curve_keys is not None:
                argv += ("--curve-router-key", str(curve_key_file(options.curve_keys, "router", public=True)),
                         "--curve-secret-key", str(curve_key_file(options.curve_keys, name, fallback=role)))
            if devices:
                argv += ("--device", devices[i % len(devices)])
            if role == "dit":
                argv += lora_argv
            if options.worker_metrics_port is not None:
                # Scrapable where the HTTP side is reachable, like the supervisor's own metrics.
                argv += ("--metrics-port", str(options.worker_metrics_port + index), "--metrics-host", options.host)
            processes.append(ProcessSpec(name, role, argv))
            index += 1
    return Deployment(
        processes=tuple(processes),
        url=f"http://{_url_host(options.host)}:{options.port}",
        bus_bind=bus_bind,
        bus_connect=bus_connect,
        expected_workers={"ar": options.num_ar, "dit": options.num_dit},
    )


def curve_key_file(keys_dir: str, name: str, *, public: bool = False, fallback: str | None = None) -> Path:
    """A key file in a `glm-image-serve keygen` folder: the router's (`router.key_secret`, or
    `router.key` if `public`), else a worker's, `workers/NAME.key_secret` or, when absent,
    `workers/FALLBACK.key_secret` (keygen's per-stage default: ar, dit). ValueError if missing."""
    base = Path(keys_dir)
    suffix = ".key" if public else ".key_secret"
    if name == "router":
        candidates = [base / f"router{suffix}"]
    else:
        candidates = [base / "workers" / f"{n}{suffix}" for n in (name, fallback) if n]
    for path in candidates:
        if path.is_file():
            return path.absolute()  # not resolve(): a restart must follow a rotated Secret's symlinks
    raise ValueError(f"--curve-keys {keys_dir}: no {' or '.join(str(c) for c in candidates)}; "
                     f"write the keys with `glm-image-serve keygen --out {keys_dir}`")


def describe_exit(returncode: int) -> str:
    """`status 1` or `signal SIGKILL`, as a person reads it."""
    return f"signal {_exit_label(returncode)}" if returncode < 0 else f"status {returncode}"


def _exit_label(returncode: int) -> str:
    if returncode >= 0:
        return str(returncode)
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"SIG{-returncode}"


class SupervisorMetrics:
    """The supervisor's Prometheus metrics on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "glm_supervisor_restarts", "Processes restarted after an unexpected exit, by process and exit status "
            "(a signal name or the exit code)", ["process", "exit"], registry=self.registry)
        self.running = Gauge("glm_supervisor_running", "1 while the process runs", ["process", "role"], registry=self.registry)
        self.gave_up = Gauge(
            "glm_supervisor_gave_up", "1 when the process was left down after a crash loop", ["process"], registry=self.registry)

    def serve(self, host: str, port: int) -> Callable[[], None]:
        """Expose /metrics on host:port (a daemon thread); returns the function that stops it."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop


class ManagedProcess:
    """One supervised process: its current incarnation, its output and its exit history."""

    def __init__(self, spec: ProcessSpec, policy: RestartPolicy, log_path: Path, echo: TextIO, tail_lines: int):
        self.spec = spec
        self.history = CrashHistory(policy)
        self.log_path = log_path
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self._echo: TextIO | None = echo
        self._process: asyncio.subprocess.Process | None = None
        # True from the start until the post-exit cleanup: only then may the group id still be ours
        # (once the group is gone, the same number can name someone else's group).
        self._group_ours = False
        self._relay: asyncio.Task | None = None
        self.incarnations = 0
        self.stopped_with: int | None = None  # the returncode when it exited during the supervisor's stop

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self, env: Mapping[str, str]) -> None:
        self.incarnations += 1
        self._process = await asyncio.create_subprocess_exec(
            *self.spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**env, **dict(self.spec.env)},
            start_new_session=True,  # its own process group: no terminal Ctrl-C, one killpg for its children
            limit=1 << 20,
        )
        self._group_ours = True
        header = f"=== {self.name} started, pid {self._process.pid} (incarnation {self.incarnations}) ==="
        self.tail.append(header)  # the crash report's tail may span incarnations
        self._write_log(header)
        self._relay = asyncio.create_task(self._relay_output(self._process.stdout), name=f"relay-{self.name}")

    async def wait(self) -> int:
        """Wait for the current incarnation to exit; kill what it left in its process group; return its returncode."""
        assert self._process is not None and self._relay is not None
        returncode = await self._process.wait()
        self.kill_group(signal.SIGKILL)  # e.g. vLLM engine processes of a SIGKILLed worker, holding the GPU
        self._group_ours = False
        # The last lines (often the error) are still in the pipe; a descendant that escaped the
        # process group could hold it open, so do not wait for it forever.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._relay), timeout=5)
        if not self._relay.done():
            self._relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relay
        return returncode

    def send(self, sig: int) -> None:
        """Signal the process itself (not its group: a worker stops its own engine processes)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(sig)

    def kill_group(self, sig: int) -> None:
        """Signal the process and everything it started (its session's process group)."""
        if self._process is not None and self._group_ours:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, sig)

    def tail_text(self) -> str:
        return "\n".join(f"    {line}" for line in self.tail) or "    (no output)"

    async def _relay_output(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the stream limit; asyncio has discarded it
                self._line("[supervisor: an over-long line was dropped]")
                continue
            if not raw:
                return
            self._line(raw.decode(errors="replace").rstrip("\r\n"))

    def _line(self, line: str) -> None:
        self.tail.append(line)
        self._write_log(line)
        if self._echo is None:
            return
        try:
            self._echo.write(f"{self.name} | {line}\n")
            self._echo.flush()
        except (OSError, ValueError):  # the terminal went away: keep serving, log files only
            self._echo = None

    def _write_log(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")


class RouterReadiness:
    """Ready when the router's /ready shows at least the expected live workers per stage."""

    def __init__(self, url: str, expected_workers: Mapping[str, int]):
        self.url = url
        self.expected_workers = dict(expected_workers)
        self.last_seen: dict[str, int] = {}
        # trust_env=False: a proxy from the environment must not sit between us and loopback.
        self._client = httpx.AsyncClient(timeout=2.0, trust_env=False)

    async def __call__(self) -> bool:
        try:
            response = await self._client.get(f"{self.url}/ready")
            self.last_seen = dict(response.json().get("live_workers", {}))
        except (httpx.HTTPError, ValueError, AttributeError):
            return False  # not up yet
        return all(self.last_seen.get(stage, 0) >= n for stage, n in self.expected_workers.items())

    def describe(self) -> str:
        wanted = ", ".join(f"{n} {stage}" for stage, n in self.expected_workers.items())
        return f"wanted {wanted} live workers, the router shows {self.last_seen or 'nothing (not answering)'}"

    async def aclose(self) -> None:
        await self._client.aclose()


@dataclass(frozen=True)
class SupervisorOptions:
    log_dir: Path  # one log file per process
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    ready_timeout_s: float = defaults.READY_TIMEOUT_S
    ready_poll_s: float = 0.25
    # How long the router may take to finish in-flight requests, then the workers to drain,
    # before SIGKILL; each phase gets its own.
    router_stop_grace_s: float = defaults.SHUTDOWN_GRACE_S + defaults.STOP_MARGIN_S
    worker_stop_grace_s: float = defaults.SHUTDOWN_GRACE_S + defaults.STOP_MARGIN_S
    tail_lines: int = 40
    metrics_host: str = defaults.LOCAL_HOST
    metrics_port: int | None = None


ReadyCheck = Callable[[], Awaitable[bool]]


class Supervisor:
    """Runs a deployment until a stop signal (or a failure); `run()` returns the exit status."""

    def __init__(
        self,
        processes: tuple[ProcessSpec, ...],
        ready_check: ReadyCheck,
        options: SupervisorOptions,
        *,
        describe_not_ready: Callable[[], str] = lambda: "",
        on_ready: Callable[[], None] | None = None,
        echo: TextIO | None = None,
        handle_signals: bool = True,
    ):
        options.log_dir.mkdir(parents=True, exist_ok=True)
        echo = echo or sys.stderr
        self.options = options
        self.processes = [
            ManagedProcess(spec, options.policy, options.log_dir / f"{spec.name}.log", echo, options.tail_lines)
            for spec in processes
        ]
        self.metrics = SupervisorMetrics()
        self._ready_check = ready_check
        self._describe_not_ready = describe_not_ready
        self._on_ready = on_ready
        self._handle_signals = handle_signals
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", SUPERVISOR_PID_ENV: str(os.getpid())}
        self.ready = False
        self.left_down: list[str] = []  # the processes given up on after a crash loop, in that order
        self._stopping = False
        self._failure: str | None = None
        # Set when the supervisor must act: a stop was requested or a fatal failure happened.
        self._attention = asyncio.Event()

    def request_stop(self, reason: str = "stop requested") -> None:
        """Begin the graceful stop; a second request kills every process at once."""
        if self._stopping:
            logger.warning("%s again: killing every process now", reason)
            for proc in self.processes:
                proc.kill_group(signal.SIGKILL)
            return
        logger.info("%s: stopping %d process(es) gracefully", reason, sum(p.running for p in self.processes))
        self._stopping = True
        self._attention.set()

    async def run(self) -> int:
        """Start everything, supervise until stopped; 0 when it was stopped and everything stopped as asked."""
        stop_metrics = None
        if self.options.metrics_port is not None:
            try:
                stop_metrics = self.metrics.serve(self.options.metrics_host, self.options.metrics_port)
            except OSError as exc:
                logger.error("launch failed: cannot serve the supervisor's metrics on %s:%d: %s",
                             self.options.metrics_host, self.options.metrics_port, exc)
                return 1
            logger.info("supervisor metrics on http://%s:%d/metrics", self.options.metrics_host, self.options.metrics_port)
        loop = asyncio.get_running_loop()
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if self._handle_signals else ()
        for signum in handled:
            loop.add_signal_handler(signum, lambda s=signum: self.request_stop(f"{signal.Signals(s).name} received"))
        keepers = [asyncio.create_task(self._keep_running(p), name=f"keep-{p.name}") for p in self.processes]
        try:
            if await self._wait_until_ready():
                self.ready = True
                if self._on_ready is not None:
                    self._on_ready()
                await self._attention.wait()
            clean = await self._stop_all(keepers)
        finally:
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            for proc in self.processes:
                proc.kill_group(signal.SIGKILL)
            for signum in handled:
                loop.remove_signal_handler(signum)
            if stop_metrics is not None:
                stop_metrics()
        if self._failure is not None:
            logger.error("exiting with status 1: %s", self._failure.splitlines()[0])
            return 1
        logger.info("all processes stopped%s", "" if clean else " (not all cleanly: see above)")
        return 0 if clean else 1

    async def _wait_until_ready(self) -> bool:
        """Poll the ready check until it passes (True), or a stop, a failure or the timeout (False)."""
        deadline = time.monotonic() + self.options.ready_timeout_s
        while not self._attention.is_set():
            if await self._ready_check():
                logger.info("system ready")
                return True
            if time.monotonic() > deadline:
                self._fail(f"launch failed: not ready after {self.options.ready_timeout_s:.0f}s: {self._describe_not_ready()}")
                return False
            # Polling the router's view; an exit or a stop wakes this at once.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._attention.wait(), timeout=self.options.ready_poll_s)
        return False

    def _fail(self, message: str) -> None:
        logger.error("%s", message)
        if self._failure is None:
            self._failure = message
        self._stopping = True
        self._attention.set()

    async def _keep_running(self, proc: ManagedProcess) -> None:
        while not self._stopping:
            try:
                await proc.start(self._env)
            except OSError as exc:
                self._fail(f"{'' if self.ready else 'launch failed: '}could not start {proc.name}: {exc}")
                return
            logger.info("%s started (pid %d)", proc.name, proc.pid)
            if self._stopping:  # the stop began while it was being spawned
                proc.send(signal.SIGTERM)
            self.metrics.running.labels(process=proc.name, role=proc.spec.role).set(1)
            returncode = await proc.wait()
            self.metrics.running.labels(process=proc.name, role=proc.spec.role).set(0)
            if self._stopping:
                proc.stopped_with = returncode
                return
            status = describe_exit(returncode)
            if not self.ready:
                self._fail(
                    f"launch failed: {proc.name} (pid {proc.pid}) exited with {status} before the system was ready; "
                    f"last lines of its log ({proc.log_path}):\n{proc.tail_text()}")
                return
            decision = proc.history.record_exit(time.monotonic())
            policy = self.options.policy
            if not decision.restart:
                self.metrics.gave_up.labels(process=proc.name).set(1)
                self.left_down.append(proc.name)
                message = (
                    f"{proc.name} (pid {proc.pid}) exited with {status}, its exit {decision.recent_exits} within "
                    f"{policy.window_s:.0f}s (max restarts: {policy.max_restarts}): crash loop, not restarting it; "
                    f"last lines of its log ({proc.log_path}):\n{proc.tail_text()}")
                if proc.spec.role == "router":
                    self._fail(message + "\nwithout a router nothing is served: stopping everything")
                else:
                    logger.error("%s\nthe other processes keep serving", message)
                return
            logger.warning(
                "%s (pid %d) exited with %s; restarting it in %.1fs (exit %d within %.0fs, max restarts: %d)",
                proc.name, proc.pid, status, decision.delay_s, decision.recent_exits, policy.window_s, policy.max_restarts)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._attention.wait(), timeout=decision.delay_s)  # backoff; a stop ends it
            if self._stopping:
                return
            self.metrics.restarts.labels(process=proc.name, exit=_exit_label(returncode)).inc()
            logger.info("restarting %s (restart %d; last exit %s)", proc.name, proc.incarnations, status)

    async def _stop_all(self, keepers: list[asyncio.Task]) -> bool:
        """SIGTERM the router, wait; SIGTERM the workers, wait; SIGKILL leftovers.
        True when every process that was running exited 0 (or, still loading, died of the SIGTERM)."""
        self._stopping = True
        self._attention.set()  # ends backoff waits
        keeper_of = dict(zip(self.processes, keepers))
        clean = True
        phases = (
            ([p for p in self.processes if p.spec.role == "router"], self.options.router_stop_grace_s),
            ([p for p in self.processes if p.spec.role != "router"], self.options.worker_stop_grace_s),
        )
        for group, grace in phases:
            active = [p for p in group if not keeper_of[p].done()]
            for proc in active:
                if proc.running:
                    logger.info("stopping %s (pid %d): SIGTERM", proc.name, proc.pid)
                    proc.send(signal.SIGTERM)
            if not active:
                continue
            _, late = await asyncio.wait([keeper_of[p] for p in active], timeout=grace)
            for proc in active:
                if keeper_of[proc] in late:
                    logger.warning("%s (pid %s) still running %.0fs after SIGTERM: SIGKILL", proc.name, proc.pid, grace)
                    proc.kill_group(signal.SIGKILL)
            if late:
                await asyncio.wait(late)
            for proc in active:
                if proc.stopped_with is None:
                    continue  # it was waiting to be restarted
                if proc.stopped_with == 0:
                    logger.info("%s (pid %d) stopped cleanly", proc.name, proc.pid)
                elif proc.stopped_with == -signal.SIGTERM:
                    # Stopped as asked, though not by its own handler: normal while it is still
                    # loading (the handlers come with serving), so not a failed stop.
                    logger.info("%s (pid %d) ended by the SIGTERM itself rather than exiting 0 (normal while still starting)",
                                proc.name, proc.pid)
                else:
                    clean = False
                    logger.warning("%s (pid %d) stopped with %s", proc.name, proc.pid, describe_exit(proc.stopped_with))
        return clean
