"""The console entry point: every subcommand documents its flags; devices resolve from the stage config."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from launch.cli import _resolve_device, build_parser

pytestmark = pytest.mark.quick


TINY_STAGE_CONFIG = Path(__file__).resolve().parent.parent / "stage_configs" / "glm_image_tiny_cpu.yaml"


@pytest.mark.parametrize("command", ["launch", "router", "ar-worker", "dit-worker", "make-tiny-model", "generate"])
def test_every_flag_has_help(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{command} --{action.dest} has no help text"


def test_help_runs_as_a_process():
    out = subprocess.run([sys.executable, "-m", "launch.cli", "ar-worker", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--router" in out and "--model" in out and "--device" in out


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "launch.cli", "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"glm-image-serve {version('glm-image-serve')}"


def test_an_uninstalled_checkout_starts_and_reads_its_version_from_pyproject(monkeypatch):
    """bench/gpu_check.sh runs `python -m launch.cli` from a checkout with no package metadata (the
    GPU machine): building the parser must not need it (it crashed the launcher there)."""
    import tomllib
    from importlib.metadata import PackageNotFoundError

    from launch import cli

    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(cli, "version", not_installed)
    pyproject = tomllib.loads((Path(cli.__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert cli._project_version() == pyproject["project"]["version"]
    assert cli.build_parser().parse_args(["ar-worker", "--router", "tcp://127.0.0.1:5570"]).command == "ar-worker"


@pytest.mark.parametrize(
    "arg,devices,engine,expected",
    [
        (None, "0", "transformers", "cuda:0"),
        (None, "1", "transformers", "cuda:1"),
        (None, "0,1", "transformers", "cuda:0"),
        (None, "0,1", "vllm", "cuda:0,1"),  # tensor parallel over both
        (None, "cpu", "vllm", "cpu"),
        ("cuda:3", "0", "vllm", "cuda:3"),
    ],
)
def test_device_resolution(arg, devices, engine, expected):
    assert _resolve_device(arg, devices, engine) == expected


def test_worker_without_a_model_says_what_to_pass(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "dit-worker", "--router", "tcp://127.0.0.1:1", "--model", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "not a GLM-Image folder" in result.stderr


def test_launch_with_a_bad_stage_config_fails_before_starting_anything(tmp_path):
    bad = tmp_path / "stage.yaml"
    bad.write_text(TINY_STAGE_CONFIG.read_text() + "\nnot_a_setting: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "launch", "--model", str(tmp_path), "--stage-config", str(bad), "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "not_a_setting" in result.stderr
    assert "started (pid" not in result.stderr


def test_launch_help_names_the_supervision_flags():
    out = subprocess.run([sys.executable, "-m", "launch.cli", "launch", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--max-restarts", "--restart-window", "--supervisor-metrics-port", "--bus-host", "--model-name", "--shutdown-grace"):
        assert flag in out


def test_a_process_started_by_a_launcher_that_is_gone_exits():
    """A child of `launch` checks that its supervisor is still its parent (else nobody would stop it)."""
    env = {**os.environ, "GLM_SERVE_SUPERVISOR_PID": "1"}  # not this process's parent
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "router", "--stage-config", str(TINY_STAGE_CONFIG), "--port", "1", "--bus-bind", "tcp://127.0.0.1:1"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode != 0
    assert "the launcher that started this process has exited" in result.stderr


def _listening_addresses(port: int) -> set[str]:
    """The local IPv4 addresses listening on TCP `port` (from /proc/net/tcp, state 0A = LISTEN)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_worker_metrics_bind_loopback_unless_told_otherwise(tiny_model, tmp_path):
    from harness.local_cluster import Cluster, free_port

    port = free_port()
    with Cluster(model=tiny_model, workdir=tmp_path, num_ar=1, num_dit=0) as cluster:
        cluster.start_worker("dit", "dit-metrics", extra=["--metrics-port", str(port)])
        cluster.wait_for_workers(1, 1, timeout=120)
        assert _listening_addresses(port) == {"127.0.0.1"}
        assert "glm_worker_jobs_in_flight" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


# --- One definition of every default -----------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launch" / "disagg_glm_image.sh"

# Every option default that more than one entry point offers: (subcommand, dest) -> the name in common/defaults.py.
SHARED_DEFAULTS = {
    ("launch", "model_name"): "MODEL_NAME", ("launch", "host"): "LOCAL_HOST", ("launch", "port"): "HTTP_PORT",
    ("launch", "bus_port"): "BUS_PORT", ("launch", "num_ar"): "NUM_AR", ("launch", "num_dit"): "NUM_DIT",
    ("launch", "max_restarts"): "MAX_RESTARTS", ("launch", "restart_window"): "RESTART_WINDOW_S",
    ("launch", "backoff_initial"): "BACKOFF_INITIAL_S", ("launch", "backoff_max"): "BACKOFF_MAX_S",
    ("launch", "ready_timeout"): "READY_TIMEOUT_S", ("launch", "shutdown_grace"): "SHUTDOWN_GRACE_S",
    ("router", "host"): "ROUTER_HOST", ("router", "port"): "HTTP_PORT", ("router", "bus_bind"): "ROUTER_BUS_BIND",
    ("router", "model_name"): "MODEL_NAME", ("router", "shutdown_grace"): "SHUTDOWN_GRACE_S",
    ("ar-worker", "metrics_host"): "LOCAL_HOST", ("ar-worker", "drain_grace"): "SHUTDOWN_GRACE_S",
    ("dit-worker", "metrics_host"): "LOCAL_HOST", ("dit-worker", "drain_grace"): "SHUTDOWN_GRACE_S",
    ("generate", "url"): "ROUTER_URL",
}


def _parser_default(command: str, dest: str):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return next(a.default for a in sub._actions if a.dest == dest)


def test_a_bare_router_binds_this_machine_only():
    """`glm-image-serve router` with no address flags serves 127.0.0.1 only, HTTP and bus, as docs/deploy.md
    says of every process: serving other machines takes --host / --bus-bind (deploy/k8s passes both)."""
    import ipaddress

    from router.core.bus import is_local_bind

    router = build_parser().parse_args(["router"])
    assert ipaddress.ip_address(router.host).is_loopback, router.host
    assert is_local_bind(router.bus_bind), router.bus_bind
    assert "127.0.0.1 by default" in (ROOT / "docs" / "deploy.md").read_text()


def test_the_parsers_read_their_defaults_from_the_defaults_module(monkeypatch):
    """Each default changed in common/defaults.py alone changes the command line: no parser repeats a value."""
    from common import defaults

    monkeypatch.delenv("GLM_URL", raising=False)
    changed = {}
    for name in set(SHARED_DEFAULTS.values()):
        value = getattr(defaults, name)
        changed[name] = value + 7 if isinstance(value, (int, float)) else f"{value}-changed"
        monkeypatch.setattr(defaults, name, changed[name])
    for (command, dest), name in SHARED_DEFAULTS.items():
        assert _parser_default(command, dest) == changed[name], f"{command} --{dest} does not default to defaults.{name}"


def test_the_option_types_default_as_the_command_line_does():
    """What the supervisor, the worker entry and the router use when built without the command line."""
    import dataclasses
    import inspect

    from common.worker_main import WorkerOptions
    from launch.supervisor import LaunchOptions, RestartPolicy, SupervisorOptions
    from router.server import serve_router

    def field_defaults(cls) -> dict:
        return {f.name: f.default for f in dataclasses.fields(cls)}

    launch = build_parser().parse_args(["launch", "--model", "m"])
    assert {k: field_defaults(LaunchOptions)[k] for k in ("model_name", "host", "port", "bus_port", "num_ar", "num_dit",
                                                           "shutdown_grace_s")} == {
        "model_name": launch.model_name, "host": launch.host, "port": launch.port, "bus_port": launch.bus_port,
        "num_ar": launch.num_ar, "num_dit": launch.num_dit, "shutdown_grace_s": launch.shutdown_grace}
    assert RestartPolicy() == RestartPolicy(launch.max_restarts, launch.restart_window, launch.backoff_initial, launch.backoff_max)
    supervisor = field_defaults(SupervisorOptions)
    assert (supervisor["ready_timeout_s"], supervisor["metrics_host"]) == (launch.ready_timeout, launch.host)
    worker = build_parser().parse_args(["dit-worker", "--router", "tcp://h:1"])
    assert (field_defaults(WorkerOptions)["metrics_host"], field_defaults(WorkerOptions)["drain_grace_s"]) == (
        worker.metrics_host, worker.drain_grace)
    router = build_parser().parse_args(["router"])
    assert inspect.signature(serve_router).parameters["shutdown_grace_s"].default == router.shutdown_grace


# --- The launcher script: its own options, everything else passed through --------------------

def _run_launcher(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`launch/disagg_glm_image.sh ARGS` without the caller's launcher settings (GLM_SERVE_VENV kept:
    the virtual environment this run uses)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GLM_") or k == "GLM_SERVE_VENV"}
    return subprocess.run([str(LAUNCHER), *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**clean, **env})


def _plan(stdout: str) -> dict[str, list[str]]:
    """`--dry-run`'s lines, `NAME: ARGV`, as NAME -> argv."""
    return {name: argv.split() for name, _, argv in (line.partition(": ") for line in stdout.splitlines())}


def test_launcher_passes_options_through_in_either_form(tmp_path):
    result = _run_launcher(f"--model={tmp_path}", "--stage-config", str(TINY_STAGE_CONFIG), "--port=28000",
                           "--num-dit", "2", "--dry-run", GLM_BUS_PORT="28001")
    assert result.returncode == 0, result.stderr
    plan = _plan(result.stdout)
    assert list(plan) == ["router", "ar-0", "dit-0", "dit-1"], result.stdout
    router = plan["router"]
    assert router[router.index("--port") + 1] == "28000"
    assert router[router.index("--bus-bind") + 1] == "tcp://127.0.0.1:28001"  # from the environment
    assert router[router.index("--stage-config") + 1] == str(TINY_STAGE_CONFIG)
    # No --model-name given with --model: launch's own default, not one the script restates.
    from common import defaults
    assert router[router.index("--model-name") + 1] == defaults.MODEL_NAME
    assert plan["dit-1"][plan["dit-1"].index("--model") + 1] == str(tmp_path)
    # The command line wins over the environment.
    result = _run_launcher(f"--model={tmp_path}", "--port", "28002", "--dry-run", GLM_PORT="28003")
    router = _plan(result.stdout)["router"]
    assert router[router.index("--port") + 1] == "28002", result.stderr


@pytest.mark.parametrize("args,message", [
    (["--xyz"], "unknown option --xyz"),
    (["--xyz=1", "--port", "1"], "unknown option --xyz"),
    (["--port"], "option --port needs a value"),
    (["--port", "--num-ar", "2"], "option --port needs a value"),
    (["--stage-config"], "option --stage-config needs a value"),
])
def test_launcher_names_what_is_wrong_with_an_option(tmp_path, args, message):
    result = _run_launcher("--model", str(tmp_path), *args)
    assert result.returncode == 2
    assert message in result.stderr and "--help" in result.stderr, result.stderr
    assert "started (pid" not in result.stderr


def test_launcher_help_lists_every_launch_option():
    result = _run_launcher("--help")
    assert result.returncode == 0, result.stderr
    launch = build_parser()._subparsers._group_actions[0].choices["launch"]
    flags = [s for a in launch._actions for s in a.option_strings if s.startswith("--")]
    assert {"--backoff-initial", "--backoff-max", "--dry-run"} <= set(flags)
    assert [f for f in flags if f not in result.stdout] == []
    assert "GLM_PORT" in result.stdout and "GLM_BACKOFF_MAX" in result.stdout


def test_launcher_script_restates_no_launch_default():
    """Its defaults are `glm-image-serve launch`'s (common/defaults.py); a copy in the script would drift."""
    from common import defaults

    script = LAUNCHER.read_text()
    for value in (defaults.HTTP_PORT, defaults.BUS_PORT, defaults.LOCAL_HOST, defaults.MODEL_NAME):
        assert str(value) not in script, f"launch/disagg_glm_image.sh restates the default {value}"
