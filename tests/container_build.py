"""Building the container image for the tests, from a clean copy of the work tree.

tests/test_container_image.py and the Kubernetes replay (tests/test_k8s_cluster.py) run the image
built here; tests/run_tests.sh builds it before the full tier (`python -m tests.container_build`),
so a first build (minutes) is part of set-up rather than competing with the tests for the CPUs.
A build whose inputs equal those of the image its tag names is not run again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "deploy" / "docker" / "build.sh"

# Where the tests' clean copy of the tree is built from: outside the repository, reused between runs.
CACHE = Path(os.environ.get("GLM_IMAGE_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glm-image-serve"))


def podman() -> str:
    """podman's path; fails (never skips) where it cannot be used."""
    podman = shutil.which("podman")
    assert podman, "podman is not installed: run tests/setup_system_packages.sh (Debian: apt-get install podman runc debootstrap)"
    assert os.geteuid() == 0, "these tests run podman as root (rootful: host networking, debootstrap for the base)"
    return podman


def podman_run_opts() -> list[str]:
    """What build.sh passes podman too: runc (crun refuses hybrid cgroups), limits the host allows."""
    opts = ["--runtime", "runc"] if shutil.which("runc") else []
    nofile = subprocess.run(["bash", "-c", "ulimit -Hn"], capture_output=True, text=True).stdout.strip()
    return opts + [f"--ulimit=nofile={nofile}:{nofile}", "--ulimit=nproc=8192:8192"]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def source_revision() -> str:
    head = _git("rev-parse", "HEAD").strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT).returncode != 0
    return head + ("+dirty" if dirty else "")


def _tree_files() -> list[str]:
    """What a clone with the uncommitted changes would hold: tracked and untracked, not ignored files."""
    names = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    return sorted(name for name in names if name and (ROOT / name).is_file())


def _clean_copy(dest: Path, files: list[str]) -> Path:
    """`files` copied to `dest` (podman keys its cached layers on contents: a fresh clone reuses them)."""
    if dest.exists():
        shutil.rmtree(dest)
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def _build_key(files: list[str], args: list[str]) -> str:
    """The build's inputs: every file's name, mode and content, and build.sh's arguments."""
    digest = hashlib.sha256("\0".join(args).encode())
    for name in files:
        path = ROOT / name
        digest.update(f"\0{name}\0{path.stat().st_mode & 0o777}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _image_id(tag: str) -> str | None:
    shown = subprocess.run([podman(), "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True)
    return shown.stdout.strip() if shown.returncode == 0 else None


def build_image(*args: str, tag: str, niceness: int = 19) -> float:
    """deploy/docker/build.sh from a clean copy of the tree, on the Debian base made here; its seconds.

    One build at a time on this machine (a lock next to the copy): test processes running side by side
    share it. A build whose inputs (files, arguments) equal those of the image `tag` still names is not
    run again: the k8s replay asks for the image the container tests just built (podman would find every
    layer cached, but even that costs ~35 s of CPU at nice 19, where a busy machine starves it).
    Beside running tests the build runs at `niceness` 19; before them (set-up) at 0."""
    CACHE.mkdir(parents=True, exist_ok=True)
    base = ["--base", os.environ["GLM_IMAGE_BASE"]] if os.environ.get("GLM_IMAGE_BASE") else ["--local-base"]
    build_args = [*base, "--revision", source_revision(), "--tag", tag, *args]
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        start = time.monotonic()
        files = _tree_files()
        key = _build_key(files, build_args)
        stamp = CACHE / f"built-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.json"
        built = json.loads(stamp.read_text()) if stamp.exists() else {}
        if built.get("key") == key and built.get("image_id") == _image_id(tag):
            return time.monotonic() - start
        stamp.unlink(missing_ok=True)
        tree = _clean_copy(CACHE / "tree", files)
        done = subprocess.run(["nice", "-n", str(niceness), "bash", str(tree / "deploy" / "docker" / "build.sh"), *build_args],
                              capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, f"build.sh {' '.join(build_args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        stamp.write_text(json.dumps({"key": key, "image_id": _image_id(tag)}))
        return time.monotonic() - start


def inspect_image(image: str, template: str) -> str:
    return subprocess.run([podman(), "image", "inspect", "--format", template, image],
                          capture_output=True, text=True, check=True).stdout.strip()


def built_cpu_image(niceness: int = 19) -> str:
    """The CPU image (glm-image-serve:0.1.0-cpu, what overlays/tiny-cpu runs), built or brought up to
    date from a clean copy of the tree; its tag. tests/test_k8s_cluster.py runs its pods from it too."""
    podman()
    CACHE.mkdir(parents=True, exist_ok=True)
    tag = subprocess.run([str(BUILD_SH), "--print-tag"], capture_output=True, text=True, check=True).stdout.strip()
    elapsed = build_image(tag=tag, niceness=niceness)
    size_mb = int(inspect_image(tag, "{{.Size}}")) / 1e6
    print(f"\nbuilt {tag} in {elapsed:.0f} s; {size_mb:.0f} MB", file=sys.stderr)
    return tag


if __name__ == "__main__":
    # tests/run_tests.sh, before the full tier: nothing else runs yet, so no nice.
    print(f"container image for the tests: {built_cpu_image(niceness=0)} up to date", file=sys.stderr)
