"""Workers find every router replica behind one DNS name, through the system resolver.

A network namespace made for the test stands in for a Kubernetes pod network: inside it all of
127.0.0.0/8 is on `lo`, two routers listen on 127.0.0.1 and 127.0.0.2, and `glm-router-bus` is an
/etc/hosts name (`/etc/netns/NS/hosts`, which `ip netns exec` mounts over /etc/hosts and which is
rewritten in place, like a headless Service's records changing). The workers are given only
`--router tcp://glm-router-bus:PORT`. Needs root (it fails, never skips, without).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.worker_runtime import RouterTarget, parse_router_targets
from harness.local_cluster import ROOT, write_stage_config

NAME = "glm-router-bus"
BUS_PORT, HTTP_PORT = 5570, 8000
ROUTERS = ("127.0.0.1", "127.0.0.2")
# Fast timings: a dropped link shows within a second, a dead peer within two.
BUS = {"bus": {"heartbeat_interval_s": 0.25, "peer_timeout_s": 2.0, "router_resolve_interval_s": 0.5}}


@dataclass
class Namespace:
    """A network namespace with its own /etc/hosts, and the processes started in it."""

    name: str
    workdir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def hosts_file(self) -> Path:
        return Path("/etc/netns") / self.name / "hosts"

    def set_hosts(self, addresses: list[str]) -> None:
        """`glm-router-bus` resolves to `addresses` from now on (none: it does not resolve)."""
        lines = ["127.0.0.1 localhost"] + [f"{ip} {NAME}" for ip in addresses]
        # In place, same inode: the running processes see this very file as their /etc/hosts.
        with open(self.hosts_file, "r+") as f:
            f.truncate()
            f.write("\n".join(lines) + "\n")

    def start(self, name: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLM_SERVE_LOG_LEVEL": "INFO", "OMP_NUM_THREADS": "1"}
        with open(self.log_path(name), "ab") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", self.name, sys.executable, "-m", "launch.cli", *args],
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def logs_tail(self) -> str:
        return "\n".join(f"--- {n} ---\n{self.log(n)[-2500:]}" for n in self.procs)

    def curl(self, url: str, body: dict | None = None, timeout: float = 10) -> tuple[int, dict | None]:
        """(status, JSON body) of an HTTP request made from inside the namespace; (0, None) if none came."""
        argv = ["ip", "netns", "exec", self.name, "curl", "-sS", "--max-time", str(timeout), "-o", "-", "-w", "\n%{http_code}", url]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        done = subprocess.run(argv, capture_output=True, timeout=timeout + 10)
        text, _, code = done.stdout.decode(errors="replace").rpartition("\n")
        try:
            return int(code or 0), json.loads(text) if text else None
        except ValueError:
            return int(code or 0), None

    def live_workers(self, router_ip: str) -> dict[str, int] | None:
        status, body = self.curl(f"http://{router_ip}:{HTTP_PORT}/ready", timeout=3)
        return body.get("live_workers", {}) if status and isinstance(body, dict) else None

    def wait(self, predicate, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None and proc.returncode != 0:
                    raise AssertionError(f"{name} exited with {proc.returncode}\n{self.logs_tail()}")
            if value := predicate():
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.logs_tail()}")

    def wait_for_log(self, name: str, text: str, timeout: float = 60.0, start: int = 0) -> None:
        self.wait(lambda: text in self.log(name)[start:], f"{text!r} in {name}'s log", timeout)


@pytest.fixture
def namespace(tmp_path):
    """A fresh network namespace with loopback up and its own hosts file; removed with everything in it."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("curl") is None:
        pytest.fail("this test builds a network namespace: it needs root, iproute2 (`ip`) and curl")
    ns = Namespace(f"glm-disc-{os.getpid()}", tmp_path)
    subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
    try:
        ns.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        ns.hosts_file.write_text("127.0.0.1 localhost\n")
        subprocess.run(["ip", "netns", "exec", ns.name, "ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        yield ns
    finally:
        for proc in ns.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)
        shutil.rmtree(ns.hosts_file.parent, ignore_errors=True)


def test_workers_follow_the_router_name_through_dns(namespace, tiny_model, tmp_path):
    ns = namespace
    config = str(write_stage_config(tmp_path, BUS))
    for i, ip in enumerate(ROUTERS):
        ns.start(f"router-{i}", "router", "--stage-config", config, "--host", ip, "--port", str(HTTP_PORT),
                 "--bus-bind", f"tcp://{ip}:{BUS_PORT}", "--model-name", "tiny")
    for stage in ("ar", "dit"):
        ns.start(stage, f"{stage}-worker", "--stage-config", config, "--router", f"tcp://{NAME}:{BUS_PORT}",
                 "--model", str(tiny_model), "--worker-id", f"{stage}-0", "--device", "cpu")

    # Start-up before the name exists: the workers wait for it, saying so.
    for stage in ("ar", "dit"):
        ns.wait_for_log(stage, f"router tcp://{NAME}:{BUS_PORT} does not resolve yet")
    for ip in ROUTERS:
        assert ns.wait(lambda ip=ip: ns.live_workers(ip), f"router {ip} up") == {"ar": 0, "dit": 0}

    # The name appears with both replicas: every worker registers with both, and both serve.
    ns.set_hosts(list(ROUTERS))
    for ip in ROUTERS:
        ns.wait(lambda ip=ip: ns.live_workers(ip) == {"ar": 1, "dit": 1}, f"both workers registered at {ip}")
    assert f"router tcp://{NAME}:{BUS_PORT} resolves to tcp://127.0.0.1:{BUS_PORT}, tcp://127.0.0.2:{BUS_PORT}" in ns.log("ar")
    for ip in ROUTERS:
        status, body = ns.curl(f"http://{ip}:{HTTP_PORT}/v1/images/generations", timeout=120,
                               body={"prompt": "a red cube", "size": "256x256", "seed": 1, "num_inference_steps": 1})
        assert status == 200 and body["data"][0]["b64_json"], (ip, status, body, ns.logs_tail())

    # DNS fails for a while: the workers keep the links they have.
    ns.set_hosts([])
    ns.wait_for_log("ar", f"cannot resolve router tcp://{NAME}:{BUS_PORT}")
    assert "keeping its 2 known address(es)" in ns.log("ar")
    deadline = time.monotonic() + 2 * BUS["bus"]["peer_timeout_s"]
    while time.monotonic() < deadline:  # longer than a peer timeout: nothing was dropped meanwhile
        assert [ns.live_workers(ip) for ip in ROUTERS] == [{"ar": 1, "dit": 1}] * 2, ns.logs_tail()
        time.sleep(0.5)

    # One replica leaves the records: its links are retired and closed; the other keeps them.
    ar_log_at = len(ns.log("ar"))
    ns.set_hosts([ROUTERS[0]])
    ns.wait(lambda: ns.live_workers(ROUTERS[1]) == {"ar": 0, "dit": 0}, "the workers to leave router 127.0.0.2")
    ns.wait_for_log("ar", f"router tcp://127.0.0.2:{BUS_PORT} left DNS", start=ar_log_at)
    ns.wait_for_log("ar", f"dropping router tcp://127.0.0.2:{BUS_PORT}", start=ar_log_at)
    ns.wait_for_log("router-1", "worker ar-0 deregistered")  # told at once (Goodbye), not by a timeout
    assert ns.live_workers(ROUTERS[0]) == {"ar": 1, "dit": 1}

    # It comes back: a fresh link registers again.
    ns.set_hosts(list(ROUTERS))
    ns.wait(lambda: ns.live_workers(ROUTERS[1]) == {"ar": 1, "dit": 1}, "the workers to rejoin router 127.0.0.2")

    # A worker stops cleanly with its discovered links.
    for stage in ("ar", "dit"):
        ns.procs[stage].send_signal(signal.SIGTERM)
    for stage in ("ar", "dit"):
        assert ns.procs[stage].wait(timeout=30) == 0, ns.log(stage)[-3000:]


@pytest.mark.parametrize("spec,expected", [
    ("tcp://10.0.0.5:5570", ("tcp://10.0.0.5:5570", None)),
    ("tcp://[::1]:5570", ("tcp://[::1]:5570", None)),
    ("tcp://glm-router-bus.default.svc:5570", ("tcp://glm-router-bus.default.svc:5570", "glm-router-bus.default.svc")),
    ("ipc:///tmp/bus.sock", ("ipc:///tmp/bus.sock", None)),
])
def test_router_addresses_that_parse(spec, expected):
    target = RouterTarget.parse(spec)
    assert (target.spec, target.host) == expected


@pytest.mark.parametrize("spec", ["glm-router-bus:5570", "tcp://glm-router-bus", "tcp://*:5570", "tcp://host:0",
                                  "udp://host:5570", "tcp://ho st:5570"])
def test_router_addresses_that_do_not(spec):
    with pytest.raises(ValueError, match="router address"):
        parse_router_targets([spec])


def test_comma_lists_and_repeats_collapse():
    targets = parse_router_targets(["tcp://10.0.0.5:5570,tcp://glm-router-bus:5570", "tcp://10.0.0.5:5570"])
    assert [t.spec for t in targets] == ["tcp://10.0.0.5:5570", "tcp://glm-router-bus:5570"]
