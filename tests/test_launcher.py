"""The launcher as a user runs it: `launch/disagg_glm_image.sh` supervising real processes.

Through the shell script (its own session, output to a file, readiness polled over HTTP):
- a worker that crashes at start-up fails the launch at once, with that worker's error;
- 2 AR + 2 DiT: SIGKILL one AR and one DiT worker while 10 requests run: every request succeeds,
  both come back (same ids) and the supervisor's restart counter moves; SIGKILL the router:
  requests fail fast while it is down and succeed again once it is back, with no manual step;
- SIGTERM to the launcher during a request: the request completes, every process exits, status 0.

And the supervisor's own rules, in process with small stand-in processes (no model): crash
loops are bounded and loud, backoff doubles up to its cap, the launch plan binds where asked.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from harness.local_cluster import free_port
from launch.supervisor import (
    CrashHistory,
    LaunchOptions,
    ManagedProcess,
    ProcessSpec,
    RestartPolicy,
    Supervisor,
    SupervisorOptions,
    bus_addresses,
    plan_deployment,
)

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launch" / "disagg_glm_image.sh"
TINY_STAGE_CONFIG = ROOT / "stage_configs" / "glm_image_tiny_cpu.yaml"
TINY_BUS = yaml.safe_load(TINY_STAGE_CONFIG.read_text())["bus"]
# Bounds the tests hold the launcher to (measured values are far below; see docs/reliability.md).
STARTUP_FAILURE_BOUND_S = 30.0
READY_BOUND_S = 180.0
RECOVERY_BOUND_S = 60.0


def generate(url: str, seed: int, size: str = "256x256", steps: int = 1, timeout: float = 180.0) -> httpx.Response:
    body = {"prompt": "a red cube", "size": size, "num_inference_steps": steps, "seed": seed}
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout, trust_env=False)


class Launcher:
    """`launch/disagg_glm_image.sh ARGS` started as a user would, output (stdout and stderr) in a file.
    Logs go to `workdir/logs`, or with `temporary_logs` to the launcher's default folder, made under
    `self.tmp_dir` (its TMPDIR) so the test sees exactly what it leaves behind."""

    def __init__(self, workdir: Path, args: list[str], temporary_logs: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_path = workdir / "launcher.out"
        self.tmp_dir = workdir / "tmp"
        # Hermetic: no launcher settings from the caller's environment; the caller's virtual environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GLM_") or k == "GLM_SERVE_VENV"}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLM_SERVE_LOG_LEVEL="INFO")
        log_args = ["--log-dir", str(workdir / "logs")]
        if temporary_logs:
            self.tmp_dir.mkdir()
            env["TMPDIR"] = str(self.tmp_dir)
            log_args = []
        command = [str(LAUNCHER), "--port", str(self.port), "--bus-port", str(free_port()), *log_args, *args]
        with open(self.output_path, "wb") as out:
            self.popen = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)

    def output(self, start: int = 0) -> str:
        return self.output_path.read_text(errors="replace")[start:]

    def pids(self, name: str) -> list[int]:
        """Every pid the supervisor started `name` with, oldest first."""
        return [int(p) for p in re.findall(rf"INFO supervisor\[\d+\] \S+: {re.escape(name)} started \(pid (\d+)\)", self.output())]

    def all_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"INFO supervisor\[\d+\] \S+: \S+ started \(pid (\d+)\)", self.output())]

    def wait_for_output(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output(start))
            if found:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in the launcher's output within {timeout}s\n{self.output()[-6000:]}")

    def live_workers(self) -> dict[str, int]:
        try:
            return httpx.get(f"{self.url}/ready", timeout=2, trust_env=False).json().get("live_workers", {})
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_for_workers(self, ar: int, dit: int, timeout: float, not_before: float = 0.0) -> float:
        """Poll /ready until it shows `ar` AR and `dit` DiT live workers at a moment >= `not_before`
        (monotonic); return that moment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, f"launcher exited with {self.popen.returncode}\n{self.output()[-6000:]}"
            now = time.monotonic()
            live = self.live_workers()
            if now >= not_before and live.get("ar", 0) == ar and live.get("dit", 0) == dit:
                return now
            time.sleep(0.1)
        raise AssertionError(f"wanted {ar} AR + {dit} DiT live workers, router shows {self.live_workers()}\n{self.output()[-6000:]}")

    def log_folder(self) -> Path:
        """The log folder the launcher announced at start."""
        return Path(self.wait_for_output(r"; logs in (\S+)", STARTUP_FAILURE_BOUND_S).group(1))

    def wait_exit(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def cleanup(self) -> None:
        """Stop whatever is left, gracefully if possible; never leave a process behind."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        for pid in self.all_pids():  # children live in their own sessions
            if _is_ours(pid):
                os.kill(pid, signal.SIGKILL)


def _is_ours(pid: int) -> bool:
    try:
        return b"launch.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return _is_ours(pid)


@pytest.fixture
def launch(tmp_path):
    started: list[Launcher] = []

    def start(*args: str, temporary_logs: bool = False) -> Launcher:
        launcher = Launcher(tmp_path, list(args), temporary_logs)
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.cleanup()


def test_worker_crashing_at_startup_fails_the_launch_with_its_error(launch):
    started = time.monotonic()
    launcher = launch("--model", "/nonexistent/GLM-Image", "--stage-config", str(TINY_STAGE_CONFIG), temporary_logs=True)
    status = launcher.wait_exit(timeout=STARTUP_FAILURE_BOUND_S)
    elapsed = time.monotonic() - started
    out = launcher.output()
    assert status != 0, out[-4000:]
    failure = re.search(r"launch failed: ((?:ar|dit)-\d) \(pid \d+\) exited with status 1 before the system was ready", out)
    assert failure, out[-4000:]
    # The worker's own message, in the failure report's log tail (not only in the relayed lines).
    report = out[failure.start():]
    assert "/nonexistent/GLM-Image is not a GLM-Image folder" in report, report[:3000]
    assert not [pid for pid in launcher.all_pids() if _alive(pid)]
    # A failed launch keeps its default (temporary) log folder for the post-mortem, and says where.
    logs = launcher.log_folder()
    assert logs.parent == launcher.tmp_dir and f"logs kept in {logs}" in out, out[-2000:]
    assert "not a GLM-Image folder" in (logs / f"{failure.group(1)}.log").read_text()
    print(f"\nstart-up failure: launcher exited {status} after {elapsed:.1f}s ({failure.group(1)} failed)")


def _kill_when_busy(launcher: Launcher, names: list[str], stage: str, start: int, timeout: float = 120) -> str:
    """SIGKILL the first of `names` seen starting a `stage` job after output offset `start`."""
    match = launcher.wait_for_output(rf"(?m)^({'|'.join(names)}) \| .*job \S+\.{stage}\.\d+ started", timeout, start)
    name = match.group(1)
    os.kill(launcher.pids(name)[-1], signal.SIGKILL)
    return name


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _restart_seconds(out: str, name: str) -> str:
    """From the supervisor seeing `name` die to its new incarnation serving, by the log timestamps
    (informational: the worker's log wording is not the launcher's to assert on)."""
    stamp = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
    died = re.search(rf"{stamp} WARNING supervisor\[\d+\] \S+: {re.escape(name)} \(pid \d+\) exited", out)
    serving = died and re.search(rf"{re.escape(name)} \| {stamp} .*worker {re.escape(name)} \(\w+\) serving", out[died.end():])
    if not serving:
        return "n/a"
    parse = lambda text: time.mktime(time.strptime(text[:19], "%Y-%m-%d %H:%M:%S")) + int(text[20:]) / 1000  # noqa: E731
    return f"{parse(serving.group(1)) - parse(died.group(1)):.1f}s"


@pytest.mark.slow  # the launcher script with real processes
def test_killed_workers_and_router_are_restarted_while_requests_succeed(launch):
    supervisor_metrics = free_port()
    launcher = launch("--num-ar", "2", "--num-dit", "2", "--supervisor-metrics-port", str(supervisor_metrics))
    launcher.wait_for_output(r"GLM-Image is serving at", READY_BOUND_S)
    models = httpx.get(f"{launcher.url}/v1/models", timeout=10, trust_env=False).json()
    assert [m["id"] for m in models["data"]] == ["glm-image-tiny-random"]  # not zai-org/GLM-Image

    # SIGKILL one AR and one DiT worker, each while it runs a job of these 10 requests.
    seeds = list(range(200, 210))
    offset = len(launcher.output())
    with ThreadPoolExecutor(len(seeds)) as pool:
        futures = [pool.submit(generate, launcher.url, seed) for seed in seeds]
        killed = [_kill_when_busy(launcher, ["ar-0", "ar-1"], "ar", offset)]
        killed_at = time.monotonic()
        killed.append(_kill_when_busy(launcher, ["dit-0", "dit-1"], "dit", len(launcher.output())))
        last_kill_at = time.monotonic()
        responses = [f.result(timeout=300) for f in futures]
    assert [r.status_code for r in responses] == [200] * len(seeds), [r.text[:200] for r in responses]
    batch_s = time.monotonic() - killed_at
    redispatched = len(re.findall(r"re-dispatching", launcher.output(offset)))

    # Both come back under the same ids. The dead incarnations leave the router's table within
    # peer_timeout_s (+ a liveness tick); 2 + 2 live workers after that means both restarts registered.
    for name in killed:
        launcher.wait_for_output(rf"{name} started \(pid \d+\)", RECOVERY_BOUND_S, offset)
        assert len(launcher.pids(name)) == 2
    dead_gone = last_kill_at + TINY_BUS["peer_timeout_s"] + 2 * TINY_BUS["heartbeat_interval_s"]
    back_at = launcher.wait_for_workers(2, 2, RECOVERY_BOUND_S, not_before=dead_gone)
    restart_logs = re.findall(r"(\S+) \(pid \d+\) exited with signal SIGKILL; restarting it in [\d.]+s", launcher.output(offset))
    assert sorted(restart_logs) == sorted(killed), restart_logs
    metrics = httpx.get(f"http://127.0.0.1:{supervisor_metrics}/metrics", timeout=10, trust_env=False).text
    for name in killed:
        assert _metric(metrics, "glm_supervisor_restarts_total", process=name, exit="SIGKILL") == 1.0, metrics
    assert sum(_metric(metrics, "glm_supervisor_running", process=p) for p in ("router", "ar-0", "ar-1", "dit-0", "dit-1")) == 5
    after = [generate(launcher.url, seed) for seed in (220, 221, 222, 223)]
    assert [r.status_code for r in after] == [200] * 4

    # SIGKILL the router: refused at once while it is down, then served again with no manual step.
    router_pid = launcher.pids("router")[-1]
    os.kill(router_pid, signal.SIGKILL)
    router_killed_at = time.monotonic()
    try:
        down = generate(launcher.url, 230, timeout=10)
        assert down.status_code in (502, 503), down.text[:300]  # the new router, before the workers re-register
    except httpx.TransportError:
        pass  # connection refused: nothing listening
    fail_fast_s = time.monotonic() - router_killed_at
    assert fail_fast_s < 5, fail_fast_s
    deadline = router_killed_at + RECOVERY_BOUND_S
    while True:
        try:
            if generate(launcher.url, 231, timeout=30).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"router not serving again within {RECOVERY_BOUND_S}s\n{launcher.output()[-6000:]}"
        time.sleep(0.25)
    router_back_s = time.monotonic() - router_killed_at
    assert len(launcher.pids("router")) == 2
    metrics = httpx.get(f"http://127.0.0.1:{supervisor_metrics}/metrics", timeout=10, trust_env=False).text
    assert _metric(metrics, "glm_supervisor_restarts_total", process="router", exit="SIGKILL") == 1.0, metrics

    os.kill(launcher.popen.pid, signal.SIGTERM)
    assert launcher.wait_exit(timeout=90) == 0, launcher.output()[-6000:]
    print(f"\nkilled {killed} during 10 requests: 10/10 ok, batch done {batch_s:.1f}s after the first kill, "
          f"{redispatched} job(s) re-dispatched; exit to serving again: "
          f"{', '.join(f'{n} {_restart_seconds(launcher.output(offset), n)}' for n in killed)}; "
          f"2+2 live (as the router sees it) {back_at - killed_at:.1f}s after the first kill; "
          f"router SIGKILL: refused in {fail_fast_s:.2f}s, serving again after {router_back_s:.1f}s")


@pytest.mark.slow  # the launcher script with real processes
def test_sigterm_during_a_request_finishes_it_and_exits_zero(launch):
    launcher = launch(temporary_logs=True)
    launcher.wait_for_output(r"GLM-Image is serving at", READY_BOUND_S)
    logs = launcher.log_folder()
    assert logs.parent == launcher.tmp_dir and (logs / "router.log").is_file()
    offset = len(launcher.output())
    with ThreadPoolExecutor(1) as pool:
        # 1024x1024: the AR stage alone takes seconds, and the DiT stage still has to run after it.
        future = pool.submit(generate, launcher.url, 300, "1024x1024", 1, 300)
        launcher.wait_for_output(r"(?m)^ar-0 \| .*job \S+\.ar\.\d+ started", 120, offset)
        os.kill(launcher.popen.pid, signal.SIGTERM)
        signalled_at = time.monotonic()
        assert not future.done()
        response = future.result(timeout=300)
    assert response.status_code == 200, response.text[:300]
    status = launcher.wait_exit(timeout=120)
    stopped_s = time.monotonic() - signalled_at
    out = launcher.output(offset)
    assert status == 0, out[-6000:]
    stopped = {name: re.search(rf"{name} \(pid \d+\) stopped cleanly", out) for name in ("router", "ar-0", "dit-0")}
    assert all(stopped.values()), out[-6000:]
    # The router went first (its request still needed the DiT worker), and only then the workers.
    assert stopped["router"].start() < out.index("stopping ar-0") < stopped["ar-0"].start(), out[-6000:]
    assert not [pid for pid in launcher.all_pids() if _alive(pid)]
    # A clean end removes the default log folder: launches do not pile folders up in /tmp.
    assert not logs.exists() and "logs kept in" not in out
    print(f"\nSIGTERM during a 1024x1024 request: 200, launcher exited 0 {stopped_s:.1f}s after the signal")


# --- The supervisor's rules, with stand-in processes ------------------------------------------

# Stands in for a router/worker: runs until SIGTERM, then exits 0.
STEADY = "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); print('steady up', flush=True); signal.pause()"
CRASHING = "import sys; print('boom: cannot open /dev/nvidia7', flush=True); sys.exit(3)"


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def _process(supervisor: Supervisor, name: str) -> ManagedProcess:
    return next(p for p in supervisor.processes if p.name == name)


async def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_crash_loop_is_bounded_and_loud_and_the_rest_keeps_running(tmp_path, caplog):
    policy = RestartPolicy(max_restarts=2, window_s=60, backoff_initial_s=0.05, backoff_max_s=0.1)
    processes = (ProcessSpec("router", "router", _python(STEADY)), ProcessSpec("ar-0", "ar", _python(CRASHING)))
    echo = io.StringIO()

    async def always_ready() -> bool:
        return True

    async def scenario() -> tuple[Supervisor, int]:
        supervisor = Supervisor(processes, always_ready, SupervisorOptions(policy=policy, log_dir=tmp_path),
                                echo=echo, handle_signals=False)
        run = asyncio.create_task(supervisor.run())
        await _until(lambda: supervisor.metrics.registry.get_sample_value("glm_supervisor_gave_up", {"process": "ar-0"}) == 1)
        assert _process(supervisor, "router").running
        supervisor.request_stop()
        return supervisor, await run

    caplog.set_level("INFO", logger="launch.supervisor")
    supervisor, status = asyncio.run(scenario())
    assert status == 0  # the router stopped cleanly on SIGTERM
    assert _process(supervisor, "ar-0").incarnations == 3  # first start + max_restarts
    assert supervisor.left_down == ["ar-0"]  # what keeps a launch's temporary log folder
    assert supervisor.metrics.registry.get_sample_value("glm_supervisor_restarts_total", {"process": "ar-0", "exit": "3"}) == 2
    crash_report = next(r.getMessage() for r in caplog.records if "crash loop" in r.getMessage())
    assert "ar-0" in crash_report and "status 3" in crash_report and "boom: cannot open /dev/nvidia7" in crash_report
    assert "the other processes keep serving" in crash_report
    assert echo.getvalue().count("ar-0 | boom") == 3  # relayed to the terminal, prefixed
    assert (tmp_path / "ar-0.log").read_text().count("boom") == 3  # and in its own log file


def test_exit_before_ready_fails_the_launch_with_the_tail(tmp_path, caplog):
    processes = (ProcessSpec("router", "router", _python(STEADY)), ProcessSpec("dit-0", "dit", _python(CRASHING)))

    async def never_ready() -> bool:
        return False

    caplog.set_level("INFO", logger="launch.supervisor")
    supervisor = Supervisor(processes, never_ready, SupervisorOptions(log_dir=tmp_path, ready_poll_s=0.05),
                            echo=io.StringIO(), handle_signals=False)
    started = time.monotonic()
    assert asyncio.run(supervisor.run()) == 1
    assert time.monotonic() - started < 10
    failure = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("launch failed"))
    assert "dit-0" in failure and "status 3 before the system was ready" in failure and "boom" in failure
    assert _process(supervisor, "dit-0").incarnations == 1  # never restarted
    assert not _process(supervisor, "router").running


def test_backoff_doubles_to_its_cap_and_old_exits_are_forgotten():
    policy = RestartPolicy(max_restarts=6, window_s=60, backoff_initial_s=1, backoff_max_s=30)
    history = CrashHistory(policy)
    delays = [history.record_exit(now=t).delay_s for t in range(6)]
    assert delays == [1, 2, 4, 8, 16, 30]
    assert not history.record_exit(now=6).restart  # the 7th exit within 60 s
    fresh = CrashHistory(policy)
    fresh.record_exit(now=0)
    decision = fresh.record_exit(now=100)  # the first exit is out of the window
    assert decision.restart and decision.recent_exits == 1 and decision.delay_s == 1


@pytest.mark.parametrize(
    "host,bus_host,bind,connect",
    [
        ("127.0.0.1", None, "tcp://127.0.0.1:5570", "tcp://127.0.0.1:5570"),
        ("0.0.0.0", None, "tcp://*:5570", "tcp://127.0.0.1:5570"),
        ("127.0.0.1", "0.0.0.0", "tcp://*:5570", "tcp://127.0.0.1:5570"),
        ("0.0.0.0", "10.0.0.5", "tcp://10.0.0.5:5570", "tcp://10.0.0.5:5570"),
    ],
)
def test_bus_binds_where_http_binds_unless_told(host, bus_host, bind, connect):
    assert bus_addresses(host, bus_host, 5570) == (bind, connect)


def test_plan_keeps_ids_devices_and_metrics_ports_per_worker():
    plan = plan_deployment(LaunchOptions(model="/m", stage_config="/c.yaml", model_name="glm-image-tiny-random",
                                         num_ar=2, num_dit=3, ar_devices=("cuda:0", "cuda:1"), dit_devices=("cuda:2",),
                                         worker_metrics_port=9100))
    by_name = {p.name: p.argv for p in plan.processes}
    assert list(by_name) == ["router", "ar-0", "ar-1", "dit-0", "dit-1", "dit-2"]
    assert "--bus-bind" in by_name["router"] and "tcp://127.0.0.1:5570" in by_name["router"]
    assert by_name["router"][by_name["router"].index("--model-name") + 1] == "glm-image-tiny-random"

    def flag(name: str, option: str) -> str:
        return by_name[name][by_name[name].index(option) + 1]

    assert [flag(n, "--worker-id") for n in by_name if n != "router"] == ["ar-0", "ar-1", "dit-0", "dit-1", "dit-2"]
    assert [flag(n, "--device") for n in ("ar-0", "ar-1", "dit-0", "dit-2")] == ["cuda:0", "cuda:1", "cuda:2", "cuda:2"]
    assert [flag(n, "--metrics-port") for n in by_name if n != "router"] == ["9100", "9101", "9102", "9103", "9104"]
    # Worker metrics bind where the HTTP side binds (127.0.0.1 by default), never every interface.
    assert {flag(n, "--metrics-host") for n in by_name if n != "router"} == {"127.0.0.1"}
    assert plan.expected_workers == {"ar": 2, "dit": 3}
