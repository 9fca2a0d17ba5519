"""The tiny-cpu Kubernetes overlay, run as separate hosts: every pod in its own network namespace.

`kubectl kustomize` renders deploy/k8s/overlays/tiny-cpu; tests/k8s_replay.py starts each pod's
containers exactly as rendered (command, args, env, mounted ConfigMaps and Secrets) on its own host
of a bridged network, with the Services resolving through /etc/hosts. A client host talks HTTP to
the router pods. Then what a cluster does to a deployment: scale the DiT Deployment up and down,
kill a router pod and bring a new one, SIGKILL an AR pod mid-request, and let a rogue "worker" with
no valid CURVE key try to join.

Each container runs from the image the overlay names (deploy/docker/build.sh's, built or brought up
to date by tests/test_container_image.py's build): `podman run` in the pod's network namespace, with
the pod's /etc/hosts, its env, args and volumes, and its securityContext (runAsUser/runAsGroup,
fsGroup, read-only root, capabilities dropped, no privilege escalation).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
import zmq.auth
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.k8s_render import render_overlay
from tests.k8s_replay import ManifestReplay, ReplayedPod, expand
from tests.netns_lab import Host, NetworkLab, wait_until
from tests.container_build import built_cpu_image, podman, podman_run_opts

# The cluster fixture builds the image first (tests/test_container_image.py): ~6 min the first time on
# 2 busy cores, counted against the first test's timeout.
pytestmark = pytest.mark.timeout(1800)

ROUTER, AR, DIT = "glm-image-router", "glm-image-ar", "glm-image-dit"
HTTP_PORT, METRICS_PORT = 8000, 9100


class Deployment:
    """The running replay plus what a client needs to talk to it."""

    def __init__(self, replay: ManifestReplay, client: Host, api_key: str):
        self.replay, self.client, self.api_key = replay, client, api_key

    def routers(self) -> list[ReplayedPod]:
        return self.replay.pods_of(ROUTER)

    def generate(self, router: ReplayedPod, size: str = "256x256", seed: int = 1, prompt: str = "a red cube"):
        return self.client.http(
            "POST", f"http://{router.ip}:{HTTP_PORT}/v1/images/generations",
            headers={"Authorization": f"Bearer {self.api_key}"},
            json_body={"prompt": prompt, "size": size, "seed": seed, "num_inference_steps": 1}, timeout=240)

    def generate_many(self, router: ReplayedPod, count: int, during=None) -> list:
        """`count` concurrent requests; `during()` runs once they are all on their way."""
        replies: list = [None] * count
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, self.generate(router, seed=100 + i)))
                   for i in range(count)]
        for t in threads:
            t.start()
        try:
            if during is not None:
                during()
        finally:
            for t in threads:
                t.join(timeout=300)
        return replies

    def metrics(self, pod: ReplayedPod, port: int) -> dict[tuple[str, tuple], float]:
        reply = self.client.http("GET", f"http://{pod.ip}:{port}/metrics", timeout=10,
                                 headers={"Authorization": f"Bearer {self.api_key}"})
        assert reply.status == 200, (pod.name, reply.status)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(reply.body.decode()) for s in family.samples}

    def jobs_done(self, worker: ReplayedPod) -> float:
        return sum(v for (name, labels), v in self.metrics(worker, METRICS_PORT).items()
                   if name == "glm_worker_jobs_total" and ("outcome", "ok") in labels)

    def targets(self, router: ReplayedPod) -> list[dict]:
        reply = self.client.http("GET", f"http://{router.ip}:{HTTP_PORT}/metrics/targets", timeout=10,
                                 headers={"Authorization": f"Bearer {self.api_key}"})
        assert reply.status == 200, reply.body[:300]
        return reply.json()


class PodmanContainer:
    """A container run by `podman run` in the foreground, behind the part of subprocess.Popen the replay
    uses: its exit status is the container's, and signals go to the container's main process (a SIGKILL
    of the podman client would leave the container running)."""

    def __init__(self, proc: subprocess.Popen, name: str):
        self.proc, self.name = proc, name

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            subprocess.run([podman(), "kill", "--signal", str(int(sig)), self.name], capture_output=True)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ImageReplay(ManifestReplay):
    """The replay with every container run from `image` by podman, as a kubelet with a container runtime would."""

    def __init__(self, objects: list[dict], lab: NetworkLab, workdir: Path, image: str):
        super().__init__(objects, lab, workdir, bin_dir=Path("/nonexistent"))
        self.image = image
        self.names: list[str] = []

    def _start_container(self, pod: ReplayedPod, container: dict, volumes: dict[str, Path], spec: dict):
        env = self._env(pod, container)
        for image_owned in ("PATH", "HOSTNAME"):  # the image's PATH; podman sets the hostname
            env.pop(image_owned, None)
        command = [expand(a, env) for a in container.get("command", [])]
        args = [expand(a, env) for a in container.get("args", [])]
        pod_security = spec.get("securityContext", {})
        security = {**pod_security, **container.get("securityContext", {})}
        name = f"{pod.name}-{container['name']}-{uuid.uuid4().hex[:6]}"
        self.names.append(name)
        argv = [podman(), "run", "--rm", "--name", name, *podman_run_opts(),
                "--network", f"ns:/run/netns/{pod.host.ns}", "--hostname", pod.name,
                # The lab's Service records, rewritten in place as pods come and go.
                "--no-hosts", "--volume", f"/etc/netns/{pod.host.ns}/hosts:/etc/hosts:ro"]
        if "runAsUser" in security:
            argv += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
        if "fsGroup" in pod_security:
            argv += ["--group-add", str(pod_security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            argv += ["--read-only", "--read-only-tmpfs=false"]  # writable: the mounted volumes only
        if security.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        for cap in security.get("capabilities", {}).get("drop", []):
            argv += ["--cap-drop", cap]
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for mount in container.get("volumeMounts", []):
            source = volumes[mount["name"]]
            if mount["name"] in empty_dirs:
                os.chmod(source, 0o1777)  # an emptyDir is writable by the pod's user, whoever that is
            if mount.get("subPath"):
                source = source / mount["subPath"]
            argv += ["--volume", f"{source}:{mount['mountPath']}:{'ro' if mount.get('readOnly') else 'rw'}"]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        if command:
            argv += ["--entrypoint", json.dumps(command)]
        if container.get("workingDir"):
            argv += ["--workdir", container["workingDir"]]
        log = self.workdir / pod.name / f"{container['name']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        pod.logs[container["name"]] = log
        with open(log, "ab") as out:
            proc = subprocess.Popen([*argv, self.image, *args], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        started = PodmanContainer(proc, name)
        pod.host.processes.append(started)  # the lab kills what still runs on a host it removes
        return started

    def close(self) -> None:
        """Remove any container a failed test left behind."""
        if self.names:
            subprocess.run([podman(), "rm", "--force", "--ignore", "--time", "5", *self.names], capture_output=True)


def _api_key(replay: ManifestReplay) -> str:
    """The first key of the Secret the router pods mount as their API-key file."""
    template = replay.deployment(ROUTER)["spec"]["template"]["spec"]
    mount = next(m for c in template["containers"] for m in c.get("volumeMounts", [])
                 if m["mountPath"].startswith("/etc/glm-image/api-keys"))
    volume = next(v for v in template["volumes"] if v["name"] == mount["name"])
    data = replay._secret(volume["secret"]["secretName"])
    lines = [line.strip() for content in data.values() for line in content.decode().splitlines()]
    return next(line for line in lines if line and not line.startswith("#"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("k8s")
    objects = render_overlay("tiny-cpu", work / "render")
    image = built_cpu_image()
    with NetworkLab() as lab:
        # The tag the overlay's pods name (tests/test_k8s_manifests.py checks it is build.sh's).
        assert {c["image"] for o in objects if o["kind"] == "Deployment"
                for c in o["spec"]["template"]["spec"]["containers"]} == {image}
        replay = ImageReplay(objects, lab, work / "pods", image)
        client = lab.add_host("client")
        routers = [replay.start_pod(ROUTER, wait_ready=False)
                   for _ in range(replay.deployment(ROUTER)["spec"]["replicas"])]
        assert len(routers) >= 2, "the router Deployment should run 2+ replicas"
        # Two AR pods, so one can be killed mid-request; DiT as rendered (1).
        for _ in range(2):
            replay.start_pod(AR, wait_ready=False)
        replay.start_pod(DIT, wait_ready=False)
        for pod in list(replay.pods):
            replay.wait_ready(pod, timeout_s=300)
        try:
            yield Deployment(replay, client, _api_key(replay))
        finally:
            for pod in list(replay.pods):
                replay.delete_pod(pod, signal.SIGKILL)
            replay.close()


def test_every_pod_runs_from_the_image_as_its_security_context_says(cluster):
    replay = cluster.replay
    for pod in replay.pods:
        for container in pod.containers.values():
            shown = subprocess.run([podman(), "container", "inspect", "--format",
                                    "{{.ImageName}} {{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}}",
                                    container.name], capture_output=True, text=True)
            assert shown.returncode == 0, shown.stderr
            image, user, read_only, dropped = shown.stdout.strip().split(" ", 3)
            assert image.endswith(replay.image) and user == "10001:10001" and read_only == "true", (pod.name, shown.stdout)
            assert "CAP_NET_RAW" in dropped and "CAP_CHOWN" in dropped, (pod.name, dropped)


def test_images_at_several_sizes_through_either_router(cluster):
    for router in cluster.routers():
        for size in ("256x256", "512x256", "256x512"):
            reply = cluster.generate(router, size=size)
            assert reply.status == 200, (router.name, size, reply.body[:300])
            image = Image.open(io.BytesIO(base64.b64decode(reply.json()["data"][0]["b64_json"])))
            assert f"{image.width}x{image.height}" == size
    # The registrations say where each worker runs: AR and DiT pods, each its own host, none a router's.
    targets = cluster.targets(cluster.routers()[0])
    hosts = {t["labels"]["stage"]: set() for t in targets}
    for t in targets:
        hosts[t["labels"]["stage"]].add(t["labels"]["host"])
    assert hosts["ar"] == {p.name for p in cluster.replay.pods_of(AR)}
    assert hosts["dit"] == {p.name for p in cluster.replay.pods_of(DIT)}
    assert {t["targets"][0].split(":")[0] for t in targets} == {p.ip for p in cluster.replay.pods_of(AR) + cluster.replay.pods_of(DIT)}


def test_both_router_pods_take_traffic_at_once(cluster):
    """The routers are replicas sharing every worker: concurrent requests through all of them at
    once queue for the shared slots (the workers arbitrate) and all succeed: no 5xx."""
    routers = cluster.routers()
    replies: list = [None] * (3 * len(routers))

    def send(i: int) -> None:
        replies[i] = cluster.generate(routers[i % len(routers)], seed=300 + i)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(replies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [r.status for r in replies] == [200] * len(replies), [(r.status, r.body[:200]) for r in replies if r.status != 200]


def test_unauthenticated_requests_are_refused(cluster):
    router = cluster.routers()[0]
    reply = cluster.client.http("POST", f"http://{router.ip}:{HTTP_PORT}/v1/images/generations",
                                json_body={"prompt": "x", "size": "256x256"})
    assert reply.status == 401, reply.body[:300]


def test_dit_scaled_up_takes_work_and_scaled_down_loses_nothing(cluster):
    replay = cluster.replay
    first = replay.pods_of(DIT)
    added = [replay.start_pod(DIT, wait_ready=False) for _ in range(2)]
    for pod in added:
        replay.wait_ready(pod)
    router = cluster.routers()[0]
    wait_until(lambda: len([t for t in cluster.targets(router) if t["labels"]["stage"] == "dit"]) == 3, 30,
               "the router to see 3 DiT workers")
    before = {p.name: cluster.jobs_done(p) for p in first + added}
    replies = cluster.generate_many(router, 6)
    assert all(r is not None and r.status == 200 for r in replies), [r and r.status for r in replies]
    for pod in added:
        assert cluster.jobs_done(pod) > before[pod.name], f"{pod.name} took no work"
    assert all(p.alive() for p in first + cluster.routers()), "scaling up restarted something"

    # Scale back down while requests run: SIGTERM drains, nothing is lost.
    codes = {}
    replies = cluster.generate_many(router, 6, during=lambda: codes.update(
        {p.name: replay.delete_pod(p, signal.SIGTERM) for p in added}))
    assert all(r is not None and r.status == 200 for r in replies), [(r and r.status, r and r.body[:200]) for r in replies]
    assert all(c == 0 for per_pod in codes.values() for c in per_pod.values()), codes


def test_router_pod_killed_then_replaced(cluster):
    replay = cluster.replay
    victim, survivor = cluster.routers()[:2]
    replay.delete_pod(victim, signal.SIGKILL)
    reply = cluster.generate(survivor, seed=7)
    assert reply.status == 200, reply.body[:300]
    # Kubernetes brings a new pod with a new address; the workers find it through the bus Service.
    replacement = replay.start_pod(ROUTER, wait_ready=False)
    assert replacement.ip != victim.ip
    replay.wait_ready(replacement, timeout_s=120)
    workers = {p.name for p in replay.pods_of(AR) + replay.pods_of(DIT)}
    wait_until(lambda: {t["labels"]["host"] for t in cluster.targets(replacement)} == workers, 60,
               "every worker to join the new router pod")
    reply = cluster.generate(replacement, seed=8)
    assert reply.status == 200, reply.body[:300]


def test_ar_pod_sigkilled_mid_request_completes_elsewhere(cluster):
    replay = cluster.replay
    ar_pods = replay.pods_of(AR)
    assert len(ar_pods) >= 2
    router = cluster.routers()[0]
    killed: list[ReplayedPod] = []

    def kill_a_busy_ar_pod():
        def busy():
            for pod in ar_pods:
                in_flight = sum(v for (name, _), v in cluster.metrics(pod, METRICS_PORT).items()
                                if name == "glm_worker_jobs_in_flight")
                if in_flight > 0:
                    return pod
            return None

        pod = wait_until(busy, 60, "an AR pod to be running a job", interval_s=0.05)
        replay.delete_pod(pod, signal.SIGKILL)
        killed.append(pod)

    replies = cluster.generate_many(router, 3, during=kill_a_busy_ar_pod)
    assert killed, "no AR pod was killed"
    assert all(r is not None and r.status == 200 for r in replies), [(r and r.status, r and r.body[:200]) for r in replies]
    replay.start_pod(AR)  # the Deployment's replacement, for what follows


def test_rogue_worker_without_a_valid_key_gets_no_job(cluster, tmp_path):
    replay = cluster.replay
    router = cluster.routers()[0]
    rogue_dir = tmp_path

    def unknown_key(template):
        # The AR pod's own keypair swapped for a fresh one the routers were never told about.
        _, secret_file = zmq.auth.create_certificates(str(rogue_dir), "rogue")
        content = Path(secret_file).read_bytes()
        for volume in template["spec"]["volumes"]:
            if "secret" in volume:
                data = replay._secret(volume["secret"]["secretName"])
                if any(key.endswith(".key_secret") and not key.startswith("router") for key in data):
                    name = volume["secret"]["secretName"] + "-rogue"
                    replay.by_kind["Secret"][name] = {"metadata": {"name": name}, "data": {
                        k: base64.b64encode(content if k.endswith(".key_secret") and not k.startswith("router") else v).decode()
                        for k, v in data.items()}}
                    volume["secret"]["secretName"] = name

    def no_key(template):
        for container in template["spec"]["containers"]:
            args, kept = container.get("args", []), []
            skip = False
            for arg in args:
                if skip:
                    skip = False
                    continue
                if arg.startswith("--curve-"):
                    skip = "=" not in arg
                    continue
                kept.append(arg)
            container["args"] = kept
            container["env"] = [e for e in container.get("env", []) if not e["name"].startswith("GLM_CURVE")]

    rogues = [replay.start_pod(AR, patch=unknown_key, wait_ready=False),
              replay.start_pod(AR, patch=no_key, wait_ready=False)]
    # Both must be up (model loaded, asking for work) before the requests, or "no job" proves nothing;
    # on a busy machine a rogue can still be loading when the router has already refused the other.
    for rogue in rogues:
        replay.wait_ready(rogue, timeout_s=240, probe="startupProbe")
    # The routers notice the unknown key and count it; the keyless one cannot even start a handshake.
    wait_until(lambda: sum(v for (name, labels), v in cluster.metrics(router, HTTP_PORT).items()
                           if name == "glm_router_workers_refused_total" and any("curve" in str(x) for x in labels)) > 0,
               120, "the router to refuse the unknown key")
    replies = cluster.generate_many(router, 4)
    assert all(r is not None and r.status == 200 for r in replies)
    for rogue in rogues:
        assert rogue.alive(), rogue.log()[-2000:]
        assert cluster.jobs_done(rogue) == 0
        assert not replay.probe(rogue, rogue.template["spec"]["containers"][0], "readinessProbe")
    stages = {t["labels"]["host"] for t in cluster.targets(router)}
    assert not stages & {r.name for r in rogues}
