"""Run rendered Kubernetes manifests as separate hosts on one machine, the way a kubelet would.

No cluster can run here, so this plays the kubelet and the cluster DNS for the objects
`kubectl kustomize` renders: each pod of a Deployment gets its own host (a network namespace on the
lab's bridge, see tests/netns_lab.py) and runs its containers' exact `command`/`args` (with
Kubernetes' `$(VAR)` expansion), `env` (values, downward-API fields, Secret and ConfigMap keys) and
mounted volumes (ConfigMaps and Secrets written out in the kubelet's `..data` symlink layout,
emptyDirs), init containers first, under a read-only root when the pod asks for one. Service names
resolve through every host's /etc/hosts: a Service maps to the addresses of the pods it selects
(a headless Service's DNS answer). Probes are plain HTTP GETs from the pod's own host.

This class runs each container's command from this checkout's `.venv` (`bin_dir`), which is what
the image holds; tests/test_k8s_cluster.py's `ImageReplay` runs them from the image itself with
podman, users, capabilities and read-only root included. Neither applies resource limits.
"""

from __future__ import annotations

import base64
import copy
import itertools
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.netns_lab import Host, Mount, NetworkLab, wait_until

# What the container image holds here: this checkout and the Python that runs it (outermost only).
_IMAGE_PATHS = {Path(__file__).resolve().parents[1], Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
_IMAGE = tuple(sorted(p for p in _IMAGE_PATHS if not any(p != q and p.is_relative_to(q) for q in _IMAGE_PATHS)))

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, `$$` escapes, unknown ones stay."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(replace, text)


@dataclass
class ReplayedPod:
    name: str
    deployment: str
    template: dict
    host: Host
    containers: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return self.host.ip

    @property
    def labels(self) -> dict[str, str]:
        return self.template["metadata"].get("labels", {})

    def log(self, container: str | None = None) -> str:
        names = [container] if container else list(self.logs)
        return "\n".join(f"--- {self.name}/{n} ---\n" + self.logs[n].read_text(errors="replace") for n in names)

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.containers.values())


class ManifestReplay:
    """Pods of the rendered Deployments, started, scaled and killed on demand."""

    def __init__(self, objects: list[dict], lab: NetworkLab, workdir: Path, bin_dir: Path):
        self.lab = lab
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.by_kind: dict[str, dict[str, dict]] = {}
        for obj in objects:
            self.by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
        self.pods: list[ReplayedPod] = []
        self._serial = itertools.count(1)

    # -- objects ----------------------------------------------------------------------------

    def deployment(self, name: str) -> dict:
        return self.by_kind["Deployment"][name]

    def _config_map(self, name: str) -> dict[str, str]:
        return self.by_kind["ConfigMap"][name].get("data", {})

    def _secret(self, name: str) -> dict[str, bytes]:
        secret = self.by_kind["Secret"][name]
        data = {k: base64.b64decode(v) for k, v in secret.get("data", {}).items()}
        data.update({k: v.encode() for k, v in secret.get("stringData", {}).items()})
        return data

    # -- pods -------------------------------------------------------------------------------

    def start_pod(self, deployment: str, patch=None, wait_ready: bool = True, ready_timeout_s: float = 240) -> ReplayedPod:
        """One more pod of `deployment` (optionally with its template changed by `patch(template)`)."""
        template = copy.deepcopy(self.deployment(deployment)["spec"]["template"])
        if patch is not None:
            patch(template)
        name = f"{deployment}-{next(self._serial)}"
        pod = ReplayedPod(name, deployment, template, self.lab.add_host(name))
        self.pods.append(pod)
        self._publish_services()
        pod_dir = self.workdir / name
        volumes = self._make_volumes(pod, pod_dir / "volumes")
        spec = template["spec"]
        for container in spec.get("initContainers", []):
            proc = self._start_container(pod, container, volumes, spec)
            code = proc.wait(timeout=300)
            if code != 0:
                raise AssertionError(f"init container {container['name']} of {name} exited {code}\n{pod.log(container['name'])}")
        for container in spec["containers"]:
            pod.containers[container["name"]] = self._start_container(pod, container, volumes, spec)
        if wait_ready:
            self.wait_ready(pod, ready_timeout_s)
        return pod

    def wait_ready(self, pod: ReplayedPod, timeout_s: float = 240, probe: str = "readinessProbe") -> None:
        """Wait until every container passes `probe` (a pod that can never be ready waits for "startupProbe")."""
        def passing() -> bool:
            if not pod.alive():
                raise AssertionError(f"{pod.name} exited before it passed its {probe}\n{pod.log()[-4000:]}")
            return all(self.probe(pod, c, probe) for c in pod.template["spec"]["containers"])

        wait_until(passing, timeout_s, f"{pod.name} to pass its {probe}")

    def probe(self, pod: ReplayedPod, container: dict, kind: str) -> bool:
        """Run one of a container's HTTP probes (no probe: passes)."""
        probe = container.get(kind)
        if probe is None:
            return True
        get = probe["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == port)
        return pod.host.http("GET", f"http://{pod.ip}:{port}{get.get('path', '/')}", timeout=5).status == 200

    def delete_pod(self, pod: ReplayedPod, sig: int = signal.SIGTERM) -> dict[str, int]:
        """Stop a pod the way Kubernetes does (SIGTERM, SIGKILL after its grace period) or kill it (SIGKILL).
        Returns each container's exit status."""
        grace = pod.template["spec"].get("terminationGracePeriodSeconds", 30)
        self.pods.remove(pod)
        self._publish_services()  # endpoints go first, as in Kubernetes
        for proc in pod.containers.values():
            if proc.poll() is None:
                proc.send_signal(sig)
        codes = {}
        for cname, proc in pod.containers.items():
            try:
                codes[cname] = proc.wait(timeout=grace if sig != signal.SIGKILL else 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[cname] = proc.wait(timeout=10)
        self.lab.remove_host(pod.host)
        return codes

    def pods_of(self, deployment: str) -> list[ReplayedPod]:
        return [p for p in self.pods if p.deployment == deployment]

    # -- the kubelet's part -----------------------------------------------------------------

    def _publish_services(self) -> None:
        """Each Service name (short and namespaced) resolves to the addresses of the pods it selects."""
        for service in self.by_kind.get("Service", {}).values():
            selector = service["spec"].get("selector", {})
            ips = [p.ip for p in self.pods if selector and all(p.labels.get(k) == v for k, v in selector.items())]
            name, namespace = service["metadata"]["name"], service["metadata"].get("namespace", "default")
            for fqdn in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"):
                self.lab.set_name(fqdn, ips)

    def _make_volumes(self, pod: ReplayedPod, root: Path) -> dict[str, Path]:
        paths = {}
        for volume in pod.template["spec"].get("volumes", []):
            path = root / volume["name"]
            path.mkdir(parents=True)
            if "configMap" in volume:
                files = {k: v.encode() for k, v in self._config_map(volume["configMap"]["name"]).items()}
                _write_atomic_volume(path, files, volume["configMap"].get("items"))
            elif "secret" in volume:
                _write_atomic_volume(path, self._secret(volume["secret"]["secretName"]), volume["secret"].get("items"))
            elif "emptyDir" not in volume:
                raise AssertionError(f"{pod.name}: volume {volume['name']} is of a kind this replay does not support: {volume}")
            paths[volume["name"]] = path
        return paths

    def _env(self, pod: ReplayedPod, container: dict) -> dict[str, str]:
        namespace = self.deployment(pod.deployment)["metadata"].get("namespace", "default")
        # What the image's environment gives: our checkout's entry point on PATH.
        env = {"PATH": f"{self.bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOSTNAME": pod.name}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self._config_map(source["configMapRef"]["name"]))
            elif "secretRef" in source:
                env.update({k: v.decode() for k, v in self._secret(source["secretRef"]["name"]).items()})
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = expand(str(var["value"]), env)
                continue
            ref = var["valueFrom"]
            if "fieldRef" in ref:
                field_path = ref["fieldRef"]["fieldPath"]
                env[var["name"]] = {"status.podIP": pod.ip, "metadata.name": pod.name, "metadata.namespace": namespace,
                                    "spec.nodeName": pod.host.name, "status.hostIP": pod.ip}[field_path]
            elif "secretKeyRef" in ref:
                env[var["name"]] = self._secret(ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]].decode()
            elif "configMapKeyRef" in ref:
                env[var["name"]] = self._config_map(ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
            else:
                raise AssertionError(f"{pod.name}: env {var['name']} uses a source this replay does not support: {ref}")
        return env

    def _start_container(self, pod: ReplayedPod, container: dict, volumes: dict[str, Path], spec: dict) -> subprocess.Popen:
        env = self._env(pod, container)
        argv = [expand(a, env) for a in container.get("command", []) + container.get("args", [])]
        if not argv:
            raise AssertionError(f"{pod.name}/{container['name']} has no command: the image's entry point is not replayed")
        mounts = []
        for mount in container.get("volumeMounts", []):
            source = volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
            mounts.append(Mount(source, mount["mountPath"], read_only=bool(mount.get("readOnly"))))
        security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
        log = self.workdir / pod.name / f"{container['name']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        pod.logs[container["name"]] = log
        return pod.host.popen(argv, env=env, log_path=log, mounts=mounts,
                              read_only_root=bool(security.get("readOnlyRootFilesystem")),
                              cwd=container.get("workingDir", "/"), image=_IMAGE)


def _write_atomic_volume(path: Path, files: dict[str, bytes], items: list[dict] | None) -> None:
    """The kubelet's layout: the files in a timestamped folder, `..data` pointing at it, and one
    symlink per key through `..data` (so an update is one atomic symlink swap)."""
    if items:
        files = {item["path"]: files[item["key"]] for item in items}
    stamp = path / "..2026_01_01_00_00_00.000000001"
    stamp.mkdir()
    for key, content in files.items():
        target = stamp / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        os.chmod(target, 0o644)
    (path / "..data").symlink_to(stamp.name)
    for key in {k.split("/", 1)[0] for k in files}:
        (path / key).symlink_to(f"..data/{key}")
