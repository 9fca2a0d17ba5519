"""Start the real system for tests: a router and stage workers as separate processes on loopback.

Processes talk over real ZeroMQ sockets and real HTTP. Readiness is polled
(`/ready` and the live worker counts), never slept for.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
TINY_STAGE_CONFIG = ROOT / "stage_configs" / "glm_image_tiny_cpu.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_stage_config(directory: Path, overrides: dict | None = None, name: str = "stage.yaml") -> Path:
    """The tiny CPU stage config with `overrides` deep-merged in."""
    config = yaml.safe_load(TINY_STAGE_CONFIG.read_text())

    def merge(base, extra):
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            elif key == "stage_args" and isinstance(value, list):
                for stage, stage_extra in zip(base[key], value):
                    merge(stage, stage_extra)
            else:
                base[key] = value

    merge(config, overrides or {})
    path = directory / name
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Cluster:
    """A running router plus workers. Use `start()`, then `stop()` (or as a context manager)."""

    model: Path
    workdir: Path
    stage_config: Path = TINY_STAGE_CONFIG
    num_ar: int = 1
    num_dit: int = 1
    http_port: int = field(default_factory=free_port)
    bus_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)
    # Extra environment for every process. One math thread each: several processes share a
    # small CPU, and oversubscribed OpenMP threads made requests several times slower.
    env: dict[str, str] = field(default_factory=lambda: {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def bus_address(self) -> str:
        return f"tcp://127.0.0.1:{self.bus_port}"

    def _spawn(self, name: str, args: list[str]) -> Proc:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLM_SERVE_LOG_LEVEL": "INFO", **self.env}
        popen = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        proc = Proc(name, popen, log_path)
        self.procs[name] = proc
        return proc

    def start_router(self, extra: list[str] | None = None) -> Proc:
        return self._spawn(
            "router",
            ["router", "--stage-config", str(self.stage_config), "--host", "127.0.0.1", "--port", str(self.http_port), "--bus-bind", self.bus_address, "--model-name", "glm-image-tiny"]
            + (extra or []),
        )

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
        """Poll until the router answers /health."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"router not answering within {timeout}s\n{self.logs_tail()}")

    def start_worker(self, stage: str, name: str, extra: list[str] | None = None) -> Proc:
        args = [f"{stage}-worker", "--stage-config", str(self.stage_config), "--router", self.bus_address, "--model", str(self.model), "--worker-id", name, "--device", "cpu"]
        return self._spawn(name, args + (extra or []))

    def start(self, timeout: float = 180.0) -> "Cluster":
        self.start_router()
        for i in range(self.num_ar):
            self.start_worker("ar", f"ar-{i}")
        for i in range(self.num_dit):
            self.start_worker("dit", f"dit-{i}")
        self.wait_for_workers(self.num_ar, self.num_dit, timeout)
        return self

    def live_workers(self) -> dict[str, int]:
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).json().get("live_workers", {})
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_for_workers(self, ar: int, dit: int, timeout: float = 180.0, exact: bool = False) -> None:
        """Poll until the router sees `ar` AR and `dit` DiT live workers (at least, or exactly)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs.values():
                if not proc.alive() and proc.popen.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()[-4000:]}")
            live = self.live_workers()
            have_ar, have_dit = live.get("ar", 0), live.get("dit", 0)
            if (have_ar, have_dit) == (ar, dit) or (not exact and have_ar >= ar and have_dit >= dit):
                return
            time.sleep(0.2)
        raise TimeoutError(f"wanted {ar} AR / {dit} DiT workers, router sees {self.live_workers()}\n{self.logs_tail()}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.alive():
            os.killpg(proc.popen.pid, sig)

    def wait_exit(self, name: str, timeout: float = 60.0) -> int:
        return self.procs[name].popen.wait(timeout=timeout)

    def logs_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log()[-chars:]}" for p in self.procs.values())

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.alive():
                os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def generate(url: str, seed: int, prompt: str = "a red cube", size: str = "256x256", steps: int = 1,
             timeout: float = 180.0, **extra) -> httpx.Response:
    """One cheap text-to-image request through the router."""
    body = {"prompt": prompt, "size": size, "num_inference_steps": steps, "seed": seed, **extra}
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)


def image_bytes(response: httpx.Response) -> list[bytes]:
    """The decoded images of a 200 images response."""
    import base64

    return [base64.b64decode(d["b64_json"]) for d in response.json()["data"]]
