"""Interrupting the test suite stops every process it started.

A pytest run of this suite's own fixtures (tests/conftest.py loaded as a plugin) starts the shared
cluster (a router and two workers), then is interrupted the way a user or CI does it: Ctrl-C
(SIGINT to its process group, as a terminal sends it), SIGTERM, or SIGKILL (no teardown at all;
the kernel's parent-death signal must do it). Afterwards none of the cluster's processes is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STOP_BOUND_S = 60.0

# Runs inside the interrupted pytest: start the cluster, say which processes it has, then wait
# for the signal (bounded, so a broken test cannot hang).
INNER_TEST = '''
import json, os, time
from pathlib import Path

def test_wait_for_the_interrupt(cluster):
    pids = {name: proc.popen.pid for name, proc in cluster.procs.items()}
    out = Path(os.environ["PIDS_FILE"])
    out.with_suffix(".tmp").write_text(json.dumps(pids))
    out.with_suffix(".tmp").rename(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
    raise AssertionError("no interrupt came")
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose, but only its parent can reap it; ours are re-parented to init.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _state(pid: int) -> str:
    """A process's state letter and the kernel function it waits in (`gone` once it has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        return f"{state} in {Path(f'/proc/{pid}/wchan').read_text() or '-'}"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return "gone"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"the inner pytest exited with {proc.returncode} before its cluster was up")
        time.sleep(0.2)
    raise AssertionError(f"no cluster within {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_interrupting_pytest_stops_every_cluster_process(tiny_model, tmp_path, how):
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    pids_file = tmp_path / "pids.json"
    env = {**os.environ, "PIDS_FILE": str(pids_file), "GLM_TINY_MODEL": str(tiny_model), "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)
    log = open(tmp_path / "inner.log", "wb")
    # Its own session, like a terminal's foreground job: Ctrl-C reaches its whole process group.
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q", "--rootdir",
         str(tmp_path), "-o", "timeout=300", str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        pids = _wait_for(pids_file, inner, timeout=180)
        assert set(pids) == {"router", "ar-0", "dit-0"} and all(_alive(p) for p in pids.values())
        if how == "ctrl-c":
            os.killpg(inner.pid, signal.SIGINT)
        else:
            inner.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        try:
            inner.wait(timeout=STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            states = {name: _state(pid) for name, pid in {"pytest": inner.pid, **pids}.items()}
            raise AssertionError(f"pytest still running {STOP_BOUND_S:.0f} s after {how}; its cluster: {states}\n"
                                 f"{(tmp_path / 'inner.log').read_text()[-3000:]}") from None
        deadline = time.monotonic() + STOP_BOUND_S
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {name: pid for name, pid in pids.items() if _alive(pid)}
        assert not left, f"still running after {how}: {left}\n{(tmp_path / 'inner.log').read_text()[-3000:]}"
    finally:
        if inner.poll() is None:
            os.killpg(inner.pid, signal.SIGKILL)
            inner.wait()
        log.close()


# An AR worker's vLLM engine core is a multiprocessing child of the worker: killed with SIGKILL,
# the worker must not leave it running with the model and its KV cache.
ENGINE_PARENT = '''
import multiprocessing, sys, time

def engine_core(ready):
    from stage_ar.vllm_plugin import register
    register()  # what vLLM runs first in every process it spawns
    ready.put(multiprocessing.current_process().pid)
    time.sleep(120)

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    ctx.Process(target=engine_core, args=(ready,)).start()
    print(ready.get(timeout=120), flush=True)
    time.sleep(120)
'''


@pytest.mark.slow
def test_a_killed_worker_takes_its_vllm_engine_process_with_it(tmp_path):
    script = tmp_path / "engine_parent.py"
    script.write_text(ENGINE_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + STOP_BOUND_S
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the engine process outlived the worker that spawned it"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if _group_alive(parent.pid):  # the spawned engine process, if it outlived the test's checks
            os.killpg(parent.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
