"""Bus security: CurveZMQ keys from `glm-image-serve keygen`, a CURVE cluster that serves, and
workers the router must keep out (no key, an unknown key, the wrong router key) until their key
joins the allow-list, which the router re-reads at runtime (Kubernetes Secret volume layout:
files behind `..data` symlinks, swapped atomically).

Every process is real (`python -m launch.cli ...`) on loopback; refusals are read back from the
router's /metrics and the workers' logs.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import zmq

from common.bus_security import BusSecurityError, load_keypair, load_public_key, write_keys
from harness.local_cluster import ROOT, Cluster, free_port, generate, write_stage_config
from tests.helpers import metric, response_image

# Short bus timings: a refused worker retries its handshake every peer timeout.
BUS = {"bus": {"heartbeat_interval_s": 0.25, "peer_timeout_s": 2.0}}
REFUSED = "glm_router_workers_refused_total"


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `glm-image-serve ARGS` as a process; its environment without any GLM_CURVE_* unless given."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GLM_CURVE_")}
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**base, **(env or {})}, timeout=timeout)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------
# keygen


def test_keygen_writes_the_layout_with_private_secrets(tmp_path):
    out = tmp_path / "keys"
    done = cli("keygen", "--out", str(out))
    assert done.returncode == 0, done.stderr
    router, ar, dit = out / "router.key_secret", out / "workers" / "ar.key_secret", out / "workers" / "dit.key_secret"
    for secret in (router, ar, dit):
        assert mode(secret) == 0o600, secret
        public = secret.with_suffix(".key")
        assert mode(public) == 0o644
        assert "secret-key" not in public.read_text()
        pair = load_keypair(secret)
        assert zmq.curve_public(pair.secret) == pair.public == load_public_key(public)
        assert str(secret) in done.stdout  # it says what goes where
    # The allow-list holds exactly the workers' public keys, never the router's nor a secret.
    allowed = sorted((out / "allowed_workers").iterdir())
    assert [p.name for p in allowed] == ["ar.key", "dit.key"]
    assert {load_public_key(p) for p in allowed} == {load_keypair(ar).public, load_keypair(dit).public}
    assert all("secret-key" not in p.read_text() for p in allowed)
    assert not list(out.glob(".keygen-*"))  # its private scratch folder is gone
    assert "--curve-keys" in done.stdout


def test_keygen_refuses_to_overwrite(tmp_path):
    out = tmp_path / "keys"
    assert cli("keygen", "--out", str(out)).returncode == 0
    before = load_keypair(out / "router.key_secret")
    again = cli("keygen", "--out", str(out))
    assert again.returncode == 1
    assert "exists" in again.stderr and "--overwrite" in again.stderr
    assert load_keypair(out / "router.key_secret") == before
    forced = cli("keygen", "--out", str(out), "--overwrite")
    assert forced.returncode == 0, forced.stderr
    assert load_keypair(out / "router.key_secret") != before
    assert mode(out / "router.key_secret") == 0o600


def test_keygen_worker_names(tmp_path):
    named = cli("keygen", "--out", str(tmp_path / "named"), "--worker", "gpu-node-1", "--worker", "gpu-node-2")
    assert named.returncode == 0, named.stderr
    assert sorted(p.name for p in (tmp_path / "named" / "allowed_workers").iterdir()) == ["gpu-node-1.key", "gpu-node-2.key"]
    counted = cli("keygen", "--out", str(tmp_path / "counted"), "--workers", "2")
    assert counted.returncode == 0, counted.stderr
    assert sorted(p.name for p in (tmp_path / "counted" / "workers").glob("*.key_secret")) == [
        "ar-0.key_secret", "ar-1.key_secret", "dit-0.key_secret", "dit-1.key_secret"]
    bad = cli("keygen", "--out", str(tmp_path / "bad"), "--worker", "../escape")
    assert bad.returncode == 1 and "worker key name" in bad.stderr
    assert not (tmp_path / "escape.key").exists()


def test_key_files_are_read_through_symlinks_and_checked(tmp_path):
    keys = write_keys(tmp_path / "keys")
    # A Kubernetes Secret volume: NAME -> ..data/NAME, ..data -> ..TIMESTAMP/
    mount = tmp_path / "mount"
    (mount / "..2026_01_01").mkdir(parents=True)
    shutil.copy(keys.router_secret, mount / "..2026_01_01" / "router.key_secret")
    (mount / "..data").symlink_to("..2026_01_01")
    (mount / "router.key_secret").symlink_to("..data/router.key_secret")
    assert load_keypair(mount / "router.key_secret") == load_keypair(keys.router_secret)
    with pytest.raises(BusSecurityError, match="holds no secret key"):
        load_keypair(keys.router_public)
    mismatched = tmp_path / "mismatched.key_secret"
    text = keys.router_secret.read_text()
    other = load_keypair(keys.workers["ar"][1]).public.decode()
    mismatched.write_text(text.replace(load_keypair(keys.router_secret).public.decode(), other))
    with pytest.raises(BusSecurityError, match="does not belong"):
        load_keypair(mismatched)
    garbage = tmp_path / "garbage.key"
    garbage.write_text('curve\n    public-key = "not-a-key"\n')
    with pytest.raises(BusSecurityError, match="z85"):
        load_public_key(garbage)


# ---------------------------------------------------------------------------
# Flags: both or neither, checked before anything loads


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    return write_keys(tmp_path_factory.mktemp("flag-keys") / "keys").out_dir


@pytest.mark.parametrize("args,env,expected", [
    (["router", "--curve-secret-key", "{keys}/router.key_secret"], {}, "needs both --curve-secret-key"),
    (["router"], {"GLM_CURVE_ALLOW_DIR": "{keys}/allowed_workers"}, "needs both --curve-secret-key"),
    (["router", "--curve-secret-key", "{keys}/router.key", "--curve-allow-dir", "{keys}/allowed_workers"], {},
     "holds no secret key"),
    (["router", "--curve-secret-key", "{keys}/nope.key_secret", "--curve-allow-dir", "{keys}/allowed_workers"], {},
     "no such key file"),
    (["router", "--curve-secret-key", "{keys}/router.key_secret", "--curve-allow-dir", "{keys}/nope"], {},
     "allow-list directory does not exist"),
    (["ar-worker", "--router", "tcp://127.0.0.1:9", "--curve-router-key", "{keys}/router.key"], {},
     "needs both --curve-router-key"),
    (["dit-worker", "--router", "tcp://127.0.0.1:9"], {"GLM_CURVE_SECRET_KEY": "{keys}/workers/dit.key_secret"},
     "needs both --curve-router-key"),
    (["ar-worker", "--router", "tcp://127.0.0.1:9", "--curve-router-key", "{keys}/router.key",
      "--curve-secret-key", "{keys}/workers/ar.key"], {}, "holds no secret key"),
    (["ar-worker", "--router", "tcp://router-without-port"], {}, "expected tcp://HOST:PORT"),
    (["launch", "--curve-keys", "{empty}"], {}, "no allowed_workers"),
], ids=["router-secret-only", "router-allow-dir-env-only", "router-public-as-secret", "router-missing-file",
        "router-missing-allow-dir", "worker-router-key-only", "worker-secret-env-only", "worker-public-as-secret",
        "worker-bad-router-address", "launch-not-a-keygen-folder"])
def test_bad_curve_flags_fail_fast_and_say_why(args, env, expected, keys, tiny_model, tmp_path):
    fill = {"keys": str(keys), "empty": str(tmp_path)}
    argv = [a.format(**fill) for a in args]
    if argv[0] != "router":
        argv += ["--model", str(tiny_model)]
    started = time.monotonic()
    done = cli(*argv, env={k: v.format(**fill) for k, v in env.items()}, timeout=60)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert expected in done.stderr, done.stderr
    assert "loading" not in done.stderr  # refused before any model load
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------------------
# A CURVE cluster


def kubernetes_mount(directory: Path, files: dict[str, bytes]) -> None:
    """Make `directory` look like a Kubernetes Secret volume holding `files`, the way the kubelet
    updates one: a fresh ..TIMESTAMP folder, the ..data symlink swapped to it by a rename, then
    the visible NAME -> ..data/NAME links added or removed."""
    directory.mkdir(parents=True, exist_ok=True)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    fresh = directory / f"..{time.time_ns()}"
    fresh.mkdir()
    for name, content in files.items():
        (fresh / name).write_bytes(content)
    (directory / "..data_tmp").symlink_to(fresh.name)
    os.rename(directory / "..data_tmp", directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    for entry in directory.iterdir():
        if not entry.name.startswith(".") and entry.name not in files:
            entry.unlink()
    if old is not None:
        shutil.rmtree(directory / old)


@pytest.fixture(scope="module")
def curve_cluster(tiny_model, tmp_path_factory):
    """Router + 1 AR + 1 DiT on CURVE; the allow-list is a Kubernetes-style Secret mount."""
    workdir = tmp_path_factory.mktemp("curve-cluster")
    keys = write_keys(workdir / "keys")
    allowed = {p.name: p.read_bytes() for p in keys.allow_dir.iterdir()}
    shutil.rmtree(keys.allow_dir)
    kubernetes_mount(keys.allow_dir, allowed)
    cluster = Cluster(model=tiny_model, workdir=workdir, stage_config=write_stage_config(workdir, BUS),
                      curve_keys=keys.out_dir)
    with cluster:
        yield cluster


def test_a_curve_cluster_serves(curve_cluster):
    response = generate(curve_cluster.url, seed=7)
    assert response.status_code == 200, response.text
    assert response_image(response).size == (256, 256)
    router_log = curve_cluster.procs["router"].log()
    assert "with CURVE" in router_log
    assert "neither authenticated nor encrypted" not in router_log
    for name in ("ar-0", "dit-0"):
        assert "with CURVE" in curve_cluster.procs[name].log()


def wait_for(predicate, timeout: float, what: str, cluster: Cluster):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{cluster.logs_tail()}")


def refused(cluster: Cluster, reason: str) -> float:
    return metric(cluster, f'{REFUSED}{{reason="{reason}"}}')


def assert_refusal_logged_once(log: str) -> None:
    """A refused worker says why once, however long it keeps retrying: no traceback per dropped heartbeat
    (zmq.asyncio's unread send Futures: "Future exception was never retrieved ... zmq.error.Again")."""
    assert "was never retrieved" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    problems = [line.split(": ", 1)[-1] for line in log.splitlines() if " ERROR " in line]
    assert problems and len(problems) == len(set(problems)), problems


def test_workers_without_an_allowed_key_never_register(curve_cluster, tmp_path):
    c = curve_cluster
    keys = c.curve_keys
    stranger = write_keys(tmp_path / "stranger", ["stranger"]).workers["stranger"]
    c.start_worker("ar", "ar-plain", curve=False)  # no keys at all
    c.start_worker("ar", "ar-stranger", curve=False, extra=[  # a valid key the router does not know
        "--curve-router-key", str(keys / "router.key"), "--curve-secret-key", str(stranger[1])])
    c.start_worker("dit", "dit-wrong-router", curve=False, extra=[  # an allowed key, but another router's key
        "--curve-router-key", str(stranger[0]), "--curve-secret-key", str(keys / "workers" / "dit.key_secret")])
    try:
        c.wait_for_log("ar-plain", r"requires CURVE: start this worker with --curve-router-key", timeout=60)
        c.wait_for_log("ar-stranger", r"refused this worker's CURVE key .* not in the router's allow-list", timeout=60)
        c.wait_for_log("dit-wrong-router", r"handshake with router .* keeps failing.*--curve-router-key", timeout=60)
        for reason in ("curve_no_key", "curve_unknown_key", "curve_bad_handshake"):
            wait_for(lambda: refused(c, reason) >= 1, 20, f"a {reason} refusal on the router's /metrics", c)
        c.wait_for_log("router", r"refused a connection from 127\.0\.0\.1 with key \S+\.\.\.: its CURVE public key "
                                 r"is not in the allow-list", timeout=10)
        # Retried (every peer timeout) and refused every time; never registered.
        unknown = refused(c, "curve_unknown_key")
        wait_for(lambda: refused(c, "curve_unknown_key") > unknown, 20, "the stranger's retry to be refused too", c)
        assert c.live_workers() == {"ar": 1, "dit": 1}
        assert "registered" not in "".join(line for line in c.procs["router"].log().splitlines()
                                           if "ar-plain" in line or "ar-stranger" in line or "dit-wrong-router" in line)
        response = generate(c.url, seed=3)  # the good workers still serve
        assert response.status_code == 200, response.text
        # A worker that was never let in stops cleanly (its drain does not wait on a dead link).
        for name in ("ar-plain", "ar-stranger", "dit-wrong-router"):
            c.kill(name, signal.SIGTERM)
            assert c.wait_exit(name, timeout=20) == 0, c.procs[name].log()[-2000:]
            assert_refusal_logged_once(c.procs[name].log())
    finally:
        for name in ("ar-plain", "ar-stranger", "dit-wrong-router"):
            c.kill(name)


def test_the_allow_list_is_reread_without_a_restart(curve_cluster, tmp_path):
    c = curve_cluster
    keys = c.curve_keys
    newcomer = write_keys(tmp_path / "newcomer", ["ar-newcomer"]).workers["ar-newcomer"]
    worker_flags = ["--curve-router-key", str(keys / "router.key"), "--curve-secret-key", str(newcomer[1])]
    mounted = {p.name: p.read_bytes() for p in (keys / "allowed_workers").iterdir() if not p.name.startswith(".")}
    probe_port = free_port()
    c.start_worker("ar", "ar-newcomer", curve=False, extra=worker_flags + ["--metrics-port", str(probe_port)])

    def worker_ready() -> tuple[int, dict]:
        response = httpx.get(f"http://127.0.0.1:{probe_port}/ready", timeout=5)
        return response.status_code, response.json()

    try:
        c.wait_for_log("ar-newcomer", r"refused this worker's CURVE key", timeout=60)
        status, body = worker_ready()  # loaded, but no router lets it in: not ready
        assert status == 503 and "not registered" in body["reason"], body
        time.sleep(1)  # a few heartbeats dropped on the refused link
        assert_refusal_logged_once(c.procs["ar-newcomer"].log())
        # The Secret gains the newcomer's public key: it registers, with no restart of anything.
        kubernetes_mount(keys / "allowed_workers", {**mounted, "ar-newcomer.key": newcomer[0].read_bytes()})
        c.wait_for_workers(2, 1, timeout=30)
        c.wait_for_log("ar-newcomer", r"bus handshake with router \S+ succeeded \(CURVE\)", timeout=10)
        c.wait_for_log("router", r"worker ar-newcomer registered", timeout=10)
        wait_for(lambda: worker_ready()[0] == 200, 10, "the newcomer's /ready to turn 200", c)
        assert c.procs["router"].alive()

        # Removed again: the connection that is up stays up (ZAP runs at the handshake), a new one is refused.
        kubernetes_mount(keys / "allowed_workers", mounted)
        c.kill("ar-newcomer", signal.SIGTERM)
        assert c.wait_exit("ar-newcomer", timeout=30) == 0
        c.wait_for_workers(1, 1, timeout=30, exact=True)
        before = refused(c, "curve_unknown_key")
        log_start = len(c.procs["router"].log())
        c.start_worker("ar", "ar-newcomer", curve=False, extra=worker_flags)
        wait_for(lambda: refused(c, "curve_unknown_key") > before, 60, "the removed key to be refused", c)
        assert "worker ar-newcomer registered" not in c.procs["router"].log()[log_start:]
        assert c.live_workers() == {"ar": 1, "dit": 1}
    finally:
        c.kill("ar-newcomer")
