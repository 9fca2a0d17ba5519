"""Render a deploy/k8s overlay the way an operator would: fresh keys, then `kubectl kustomize`.

    from tests.k8s_render import render_overlay
    objects = render_overlay("tiny-cpu", tmp_path)   # list of the rendered objects (dicts)

The overlays' secretGenerators read files the operator creates (never committed): CurveZMQ keys
from `glm-image-serve keygen` and an API-key file. This copies deploy/k8s into `workdir` (without
any secrets a developer may have made in the checkout), creates them there, and renders.
Fails, never skips, when kubectl is missing: tests/setup_system_packages.sh installs it.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "tiny-cpu")


def _no_operator_secrets(directory: str, names: list[str]) -> set[str]:
    if Path(directory).name == "secrets":
        return {n for n in names if n != "README.md"}
    return set()


def make_secrets(overlay_dir: Path) -> Path:
    """Create `overlay_dir/secrets/`: bus keys (`glm-image-serve keygen`) and a one-key API-key file."""
    out = overlay_dir / "secrets"
    out.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "launch.cli", "keygen", "--out", str(out / "bus")], cwd=ROOT,
                   check=True, capture_output=True, text=True, timeout=60)
    (out / "api-keys").write_text(secrets.token_urlsafe(32) + "\n")
    return out


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize directory`, parsed; AssertionError with kubectl's message on failure."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not installed (tests/setup_system_packages.sh installs it)"
    done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


def render_overlay(name: str, workdir: Path) -> list[dict]:
    """Copy deploy/k8s into `workdir`, create the overlay's secrets there, render it; return the objects."""
    assert name in OVERLAYS, f"no overlay {name!r}; there are {OVERLAYS}"
    tree = Path(workdir) / "k8s"
    shutil.copytree(K8S, tree, ignore=_no_operator_secrets)
    overlay = tree / "overlays" / name
    make_secrets(overlay)
    return kustomize(overlay)
