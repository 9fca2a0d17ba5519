"""The console entry point: every subcommand documents its flags; devices resolve from the stage config."""

import subprocess
import sys

import pytest

from launch.cli import _resolve_device, build_parser


@pytest.mark.parametrize("command", ["router", "ar-worker", "dit-worker", "make-tiny-model", "generate"])
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
