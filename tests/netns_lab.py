"""Separate network hosts on one machine, for the multi-host tests.

Each host is a network namespace with its own `eth0` on a bridge, its own `/etc/hosts`
(`/etc/netns/NS/hosts`, which `ip netns exec` mounts over /etc/hosts) and, for every process started on
it, its own hostname and a private mount namespace (for the files a pod mounts, and a read-only root).
The bridge lives in a namespace of its own too, so the machine's own network is never touched.

Addresses come from 198.18.0.0/15 (RFC 2544's benchmarking range) and exist only inside the
namespaces made here; everything is removed by `close()`. Needs root.
"""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

_NETNS_ETC = Path("/etc/netns")


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class Mount:
    """A bind mount inside one process's private mount namespace (a pod's volume)."""

    source: Path
    target: str
    read_only: bool = False


@dataclass
class HttpReply:
    status: int
    body: bytes

    def json(self):
        import json

        return json.loads(self.body)


@dataclass
class Host:
    """One namespace on the lab's bridge: a stand-in for a machine (a Kubernetes pod, or a node)."""

    lab: "NetworkLab"
    name: str
    ns: str
    ip: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, argv: list[str], *, env: dict[str, str], log_path: Path, mounts: list[Mount] = (),
              read_only_root: bool = False, cwd: str | None = None, image: tuple[Path, ...] = ()) -> subprocess.Popen:
        """Start `argv` on this host: its network, its hostname, its mounts (created here, seen only there).

        `image` are the machine's folders that stand in for the container image (this checkout, its
        Python): a mount over one of them (a pod's emptyDir at /tmp over a checkout in /tmp) must
        not hide them, so they are bound into that mount's source first and carried along with it."""
        script = [f"hostname {shlex.quote(self.name)}"]
        # A mount over a folder that holds other volumes' sources (a pod's /tmp over this machine's
        # /tmp/pytest-...) goes after them: mounted first, it would hide them from the later binds.
        mounts = sorted(mounts, key=lambda m: any(o.source.is_relative_to(m.target) for o in mounts if o is not m))
        for mount in mounts:
            # Mount points are made before the root turns read-only; on the machine they stay empty.
            self.lab.make_mount_point(mount)
        image_binds = []
        for mount in mounts:
            hidden = [p for p in image if p.is_relative_to(mount.target) and p != Path(mount.target)]
            for path in hidden:
                staged = mount.source / path.relative_to(mount.target)
                staged.mkdir(parents=True, exist_ok=True)  # an empty folder in the volume, on the machine
                script.append(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(staged))}")
                image_binds.append(path)
            bind = "--rbind" if hidden else "--bind"
            script.append(f"mount {bind} {shlex.quote(str(mount.source))} {shlex.quote(mount.target)}")
            if mount.read_only:
                script.append(f"mount -o remount,bind,ro {shlex.quote(mount.target)}")
        if read_only_root:
            # Last, so the volumes (mounts of their own, bound from writable folders) stay writable.
            # The mount namespace is private: the machine's root stays read-write.
            script.append("mount -o remount,bind,ro /")
            script += [f"mount -o remount,bind,ro {shlex.quote(str(path))}" for path in image_binds]
        script.append('exec "$@"')
        full = ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--uts", "--propagation", "private", "--",
                "/bin/sh", "-ec", "; ".join(script), self.name, *argv]
        log = open(log_path, "ab")
        try:
            # `ip netns exec`, unshare and sh all exec: the pid is the program's own, so signals reach it.
            proc = subprocess.Popen(full, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log.close()
        self.processes.append(proc)
        return proc

    def run(self, argv: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True, timeout=timeout, env=env)

    def http(self, method: str, url: str, *, json_body=None, headers: dict[str, str] | None = None,
             timeout: float = 120) -> HttpReply:
        """One HTTP request from this host (curl), so it crosses the lab's network like a client's would."""
        import json

        argv = ["curl", "-sS", "-X", method, "-o", "-", "-w", "\n%{http_code}", "--max-time", str(timeout), url]
        for key, value in (headers or {}).items():
            argv += ["-H", f"{key}: {value}"]
        if json_body is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(json_body)]
        done = self.run(argv, timeout=timeout + 10)
        out = done.stdout
        body, _, code = out.rpartition(b"\n")
        return HttpReply(status=int(code or 0) if done.returncode == 0 else 0, body=body)

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 30) -> int:
        """Signal a process; SIGKILL it when `grace_s` passes; return its exit status."""
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode


class NetworkLab:
    """A bridge and the hosts on it. Use as a context manager; `close()` removes every trace."""

    SUBNET_PREFIX = "198.18.0."

    def __init__(self, tag: str | None = None):
        if os.geteuid() != 0:
            raise RuntimeError("the multi-host tests build network namespaces and need root")
        self.tag = tag or f"glm{os.getpid() % 100000}"
        self.switch_ns = f"{self.tag}-sw"
        self.hosts: list[Host] = []
        self._numbers = itertools.count(2)
        self._names: dict[str, list[str]] = {}
        self._made_dirs: list[Path] = []
        _ip("netns", "add", self.switch_ns)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch_ns)
        _ip("link", "set", "br0", "up", ns=self.switch_ns)

    def __enter__(self) -> "NetworkLab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_host(self, name: str) -> Host:
        """A new namespace with `eth0` on the bridge at the next free 198.18.0.x address."""
        number = next(self._numbers)
        if number > 250:
            raise RuntimeError("the lab's /24 is full")
        ns, ip = f"{self.tag}-{number}", f"{self.SUBNET_PREFIX}{number}"
        _ip("netns", "add", ns)
        host = Host(self, name, ns, ip)
        self.hosts.append(host)
        port = f"p{number}"
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.switch_ns)
        _ip("link", "set", port, "master", "br0", "up", ns=self.switch_ns)
        _ip("addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("link", "set", "lo", "up", ns=ns)
        (_NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
        self._write_hosts_file(host)
        return host

    def remove_host(self, host: Host) -> None:
        """Kill what still runs there and delete the namespace (its veth goes with it)."""
        for proc in host.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        shutil.rmtree(_NETNS_ETC / host.ns, ignore_errors=True)
        if host in self.hosts:
            self.hosts.remove(host)

    def set_name(self, name: str, ips: list[str]) -> None:
        """Make `name` resolve to `ips` on every host (a DNS record; several for a headless Service)."""
        self._names[name] = list(ips)
        for host in self.hosts:
            self._write_hosts_file(host)

    def _write_hosts_file(self, host: Host) -> None:
        lines = ["127.0.0.1 localhost", f"{host.ip} {host.name}"]
        lines += [f"{ip} {name}" for name, ips in self._names.items() for ip in ips]
        path = _NETNS_ETC / host.ns / "hosts"
        # In place (same inode): `ip netns exec` bind-mounted this very file over the running processes' /etc/hosts.
        with open(path, "a+") as f:
            f.seek(0)
            f.truncate()
            f.write("\n".join(lines) + "\n")

    def make_mount_point(self, mount: Mount) -> None:
        target = Path(mount.target)
        if target.exists():
            return
        missing = target
        while not missing.parent.exists():
            missing = missing.parent
        if mount.source.is_dir():
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        self._made_dirs.append(missing)

    def close(self) -> None:
        for host in list(self.hosts):
            self.remove_host(host)
        subprocess.run(["ip", "netns", "del", self.switch_ns], capture_output=True)
        # Empty mount points made on the machine for pods' volumes.
        for path in reversed(self._made_dirs):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    """Poll `predicate` until it returns a truthy value; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)
