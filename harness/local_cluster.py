"""Start a local router and N stage workers as real processes, from Python.

    from harness.local_cluster import Cluster, generate, image_bytes

    with Cluster(model=Path("models/tiny-glm-image"), workdir=Path("/tmp/run"), num_ar=1, num_dit=2) as cluster:
        png = image_bytes(generate(cluster.url, seed=1))[0]

Every process is `python -m launch.cli ...` on loopback, talking real ZeroMQ and
real HTTP, with its output in `<workdir>/<name>.log`. Readiness is polled
(`/health`, `/ready` and the live worker counts) with a deadline, never slept
for. Used by the tests and by `bench/`.
"""

from __future__ import annotations

import base64
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from launch.supervisor import SUPERVISOR_PID_ENV

ROOT = Path(__file__).resolve().parent.parent
TINY_STAGE_CONFIG = ROOT / "stage_configs" / "glm_image_tiny_cpu.yaml"


# Ports handed out below Linux's ephemeral range (32768-60999 by default), so that no outgoing
# connection can take a port between `free_port()` and the server binding it; each parallel test
# runner (pytest-xdist's PYTEST_XDIST_WORKER=gwN) draws from its own slice.
PORT_RANGE = (10000, 32000)
PORT_SLICES = 8


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) % PORT_SLICES if worker[2:].isdigit() else 0
    width = (PORT_RANGE[1] - PORT_RANGE[0]) // PORT_SLICES
    return range(PORT_RANGE[0] + index * width, PORT_RANGE[0] + (index + 1) * width)


class _PortSequence:
    """Walks this runner's port slice in order from a random start, so that one process never hands out
    a port twice before the whole slice has gone by (ports handed out are often bound only later, when
    every port of a cluster is known, so "free right now" alone could give two servers the same one)."""

    def __init__(self, ports: range):
        self._ports = ports
        self._next = random.randrange(len(ports))
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            for _ in range(len(self._ports)):
                port = self._ports[self._next]
                self._next = (self._next + 1) % len(self._ports)
                with socket.socket() as s:
                    try:
                        s.bind(("127.0.0.1", port))
                    except OSError:
                        continue
                    return port
        raise RuntimeError(f"no free port in {self._ports.start}-{self._ports.stop - 1}")


_PORTS = _PortSequence(_port_slice())


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now and not handed out before by this process, from
    this test runner's slice of the port range."""
    return _PORTS.take()


def write_stage_config(directory: Path, overrides: dict | None = None, name: str = "stage.yaml",
                       base: Path = TINY_STAGE_CONFIG) -> Path:
    """Write `base` (the tiny CPU stage config by default) with `overrides` deep-merged in; return its path.

    Dicts merge key by key; `stage_args` merges its list element-wise (first override into the AR
    stage, second into the DiT stage); anything else replaces the value.
    """
    config = merge_stage_overrides(yaml.safe_load(base.read_text()), overrides or {})
    path = directory / name
    path.write_text(yaml.safe_dump(config))
    return path


def merge_stage_overrides(into: dict, extra: dict) -> dict:
    """Deep-merge `extra` into the stage config dict `into` (in place; returned): dicts key by key,
    `stage_args` element-wise (first into the AR stage, second into the DiT stage), the rest replaced."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_stage_overrides(into[key], value)
        elif key == "stage_args" and isinstance(value, list):
            for stage, stage_extra in zip(into[key], value):
                merge_stage_overrides(stage, stage_extra)
        else:
            into[key] = value
    return into


@dataclass
class Proc:
    """One process of a cluster and its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        """Everything the process has written so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Cluster:
    """A router plus `num_ar` AR and `num_dit` DiT workers on `model`, each a process of its own.

    `start()` (or `with Cluster(...) as c:`) returns once the router sees every worker; if it
    fails or times out it stops whatever it had started before raising. `stop()` ends them all.
    Single processes can be started, killed and restarted by name to exercise failures.
    """

    model: Path
    workdir: Path
    stage_config: Path = TINY_STAGE_CONFIG
    num_ar: int = 1
    num_dit: int = 1
    model_name: str = "glm-image-tiny"
    start_timeout: float = 180.0  # seconds `start()` waits for the workers to register
    http_port: int = field(default_factory=free_port)
    bus_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    # A `glm-image-serve keygen` folder: the bus runs CurveZMQ, every worker with its stage's key
    # (workers/ar.key_secret, workers/dit.key_secret). None: plaintext.
    curve_keys: Path | None = None
    # Give every worker a --metrics-port (kept across restarts under the same name): it then serves
    # /metrics and the router lists it at /metrics/targets for Prometheus.
    worker_metrics: bool = False
    metrics_ports: dict[str, int] = field(default_factory=dict)  # worker name -> its metrics port
    # API keys the router requires on /v1/* (in its environment, $GLM_API_KEY); none: the API is open.
    api_keys: tuple[str, ...] = ()
    # Extra environment for every process. One math thread each: several processes share a
    # small CPU, and oversubscribed OpenMP threads made requests several times slower.
    env: dict[str, str] = field(default_factory=lambda: {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

    @property
    def url(self) -> str:
        """The router's HTTP base URL."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def bus_address(self) -> str:
        """The router's ZeroMQ address, where workers connect."""
        return f"tcp://127.0.0.1:{self.bus_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        """The Authorization header of the first API key, or {} when the API is open."""
        return {"Authorization": f"Bearer {self.api_keys[0]}"} if self.api_keys else {}

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLM_SERVE_LOG_LEVEL": "INFO", **self.env, **(extra_env or {})}
        # The process asks the kernel for a SIGTERM when this one dies (launch/cli.py:
        # die_with_supervisor), so a test run that is killed leaves nothing behind. Linux sends it
        # when the spawning *thread* ends, hence only from the main thread.
        if threading.current_thread() is threading.main_thread():
            env[SUPERVISOR_PID_ENV] = str(os.getpid())
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            # A session of its own, so that signals reach the process and any children it spawns.
            popen = subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc = Proc(name, popen, log_path)
        self.procs[name] = proc
        return proc

    def start_router(self, extra: list[str] | None = None) -> Proc:
        """Start (or restart, under the same name and ports) the router process."""
        curve = []
        if self.curve_keys is not None:
            curve = ["--curve-secret-key", str(self.curve_keys / "router.key_secret"),
                     "--curve-allow-dir", str(self.curve_keys / "allowed_workers")]
        return self._spawn(
            "router",
            ["router", "--stage-config", str(self.stage_config), "--host", "127.0.0.1", "--port", str(self.http_port),
             "--bus-bind", self.bus_address, "--model-name", self.model_name] + curve + (extra or []),
            # Set even when empty: a key from the test's own environment must not leak in.
            {"GLM_API_KEY": ",".join(self.api_keys), "GLM_API_KEY_FILE": ""},
        )

    def start_worker(self, stage: str, name: str, extra: list[str] | None = None, curve: bool = True,
                     metrics: bool | None = None) -> Proc:
        """Start a worker of `stage` ("ar" or "dit") named `name`; it registers with the router on its own.
        It serves metrics when `metrics` says so (default: `worker_metrics`) or `extra` has a --metrics-port.

        With `curve_keys` it gets its stage's CURVE key unless `curve` is False (then `extra` may
        pass other --curve-* flags, or none: a plaintext worker)."""
        args = [f"{stage}-worker", "--stage-config", str(self.stage_config), "--router", self.bus_address,
                "--model", str(self.model), "--worker-id", name, "--device", "cpu"]
        if self.curve_keys is not None and curve:
            args += ["--curve-router-key", str(self.curve_keys / "router.key"),
                     "--curve-secret-key", str(self.curve_keys / "workers" / f"{stage}.key_secret")]
        if (self.worker_metrics if metrics is None else metrics) and "--metrics-port" not in (extra or []):
            args += ["--metrics-port", str(self.metrics_ports.setdefault(name, free_port()))]
        return self._spawn(name, args + (extra or []))

    def start(self, timeout: float | None = None) -> "Cluster":
        """Start the router and the workers; return once the router sees them all.

        Waits at most `timeout` seconds (default `start_timeout`). On any failure, a timeout
        included, every process started so far is stopped before the error propagates.
        """
        try:
            self.start_router()
            for i in range(self.num_ar):
                self.start_worker("ar", f"ar-{i}")
            for i in range(self.num_dit):
                self.start_worker("dit", f"dit-{i}")
            deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
            # The router first: with no workers to wait for, /ready alone would not prove it is up.
            self.wait_for_http(timeout=deadline - time.monotonic())
            self.wait_for_workers(self.num_ar, self.num_dit, timeout=deadline - time.monotonic())
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_log(self, name: str, pattern: str, timeout: float = 60.0, start: int = 0) -> re.Match:
        """Poll `name`'s log (from character `start`) until the regex `pattern` matches; return the match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.procs[name].log()[start:])
            if found:
                return found
            time.sleep(0.1)
        raise TimeoutError(f"{pattern!r} not in {name}'s log within {timeout}s\n{self.logs_tail()}")

    def wait_for_http(self, timeout: float = 60.0) -> None:
        """Poll until the router answers /health.

        Raises RuntimeError at once if a process exits with an error, TimeoutError at the deadline.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_if_failed()
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"router not answering within {timeout}s\n{self.logs_tail()}")

    def live_workers(self) -> dict[str, int]:
        """Live workers per stage as the router reports them on /ready ({} while it does not answer)."""
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).json().get("live_workers", {})
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_for_workers(self, ar: int, dit: int, timeout: float = 180.0, exact: bool = False) -> None:
        """Poll until the router sees `ar` AR and `dit` DiT live workers (at least, or exactly).

        Raises RuntimeError at once if a process exits with an error, TimeoutError at the deadline.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._raise_if_failed()
            live = self.live_workers()
            have_ar, have_dit = live.get("ar", 0), live.get("dit", 0)
            if (have_ar, have_dit) == (ar, dit) or (not exact and have_ar >= ar and have_dit >= dit):
                return
            time.sleep(0.2)
        raise TimeoutError(f"wanted {ar} AR / {dit} DiT workers, router sees {self.live_workers()}\n{self.logs_tail()}")

    def _raise_if_failed(self) -> None:
        # Exits by SIGTERM/SIGKILL are the ones a test (or `stop`) asked for.
        for proc in self.procs.values():
            if not proc.alive() and proc.popen.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
                raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()[-4000:]}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to process `name` (and its children) if it is still running."""
        proc = self.procs[name]
        if proc.alive():
            _signal_group(proc, sig)

    def wait_exit(self, name: str, timeout: float = 60.0) -> int:
        """Wait for process `name` to exit; return its exit status."""
        return self.procs[name].popen.wait(timeout=timeout)

    def logs_tail(self, chars: int = 3000) -> str:
        """The end of every process's log, for error messages."""
        return "\n".join(f"--- {p.name} ---\n{p.log()[-chars:]}" for p in self.procs.values())

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM every process, wait up to `grace` seconds in all, then SIGKILL what is left."""
        for proc in self.procs.values():
            if proc.alive():
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.popen.wait()

    def __enter__(self) -> "Cluster":
        return self.start()  # stops what it started if it fails: __exit__ would not run

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(proc: Proc, sig: int) -> None:
    try:
        os.killpg(proc.popen.pid, sig)
    except ProcessLookupError:  # exited (with its children) since we looked
        pass


def generate(url: str, seed: int | None, prompt: str = "a red cube", size: str | None = "256x256", steps: int | None = 1,
             timeout: float = 180.0, headers: dict | None = None, **extra) -> httpx.Response:
    """One text-to-image request to the router at `url` (cheap by default); `extra` goes into the body.

    `size=None` leaves the size out, so the router's default applies; `seed=None` or `steps=None` send null (the defaults).
    """
    body = {"prompt": prompt, "num_inference_steps": steps, "seed": seed, **extra}
    if size is not None:
        body["size"] = size
    return httpx.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=timeout)


def image_bytes(response: httpx.Response) -> list[bytes]:
    """The decoded images of a 200 images response."""
    return [base64.b64decode(d["b64_json"]) for d in response.json()["data"]]
