"""The console entry point: every subcommand documents its flags; devices resolve from the stage config."""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from launch.cli import _resolve_device, build_parser


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
