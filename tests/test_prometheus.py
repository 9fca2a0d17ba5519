"""A real Prometheus (Debian's, installed by tests/setup_system_packages.sh) scrapes a live cluster.

It is pointed at the router only, with the example configuration deploy/prometheus/prometheus.yml
(addresses and intervals changed for the test), and must find every worker through the router's
GET /metrics/targets. Then every PromQL query the deployment ships (each panel of the Grafana
dashboard, each alert rule, each KEDA trigger) must parse and return data from the live system,
and the per-stage queue and slot gauges must be exact under load. Everything listens on 127.0.0.1;
the Prometheus configuration has no remote write and no Alertmanager.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from harness.local_cluster import Cluster, free_port, generate, write_stage_config
from tests.metrics_catalogue import (
    ALERTS,
    DASHBOARD,
    K8S,
    METRICS_DOC,
    PROMETHEUS_CONFIG,
    alert_query,
    alert_rules,
    dashboard_queries,
    documented_families,
    keda_queries,
    metric_names,
)

# AR capacity 1 + this bound: a request for 10 images is refused (429) at once.
QUEUE_LIMIT = 8
SCRAPE_INTERVAL = "1s"
# How long Prometheus may take to discover, scrape and hold two samples of everything.
DATA_DEADLINE_S = 60


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: run tests/setup_system_packages.sh (Debian package prometheus)"
    return path


def _http() -> httpx.Client:
    return httpx.Client(timeout=10, trust_env=False)  # loopback only: never through a proxy


class Prometheus:
    """A Prometheus server process on 127.0.0.1 with its own storage; `stop()` ends it."""

    def __init__(self, config: Path, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        # Proxy variables removed: Prometheus must only ever talk to loopback.
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [_tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=info"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.http = _http()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, f"prometheus exited with {self.popen.returncode}:\n{self.log()[-4000:]}"
            try:
                if self.http.get(f"{self.url}/-/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready within {timeout}s:\n{self.log()[-4000:]}")

    def api(self, path: str, **params: str) -> dict | list:
        response = self.http.get(f"{self.url}/api/v1/{path}", params=params)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {response.status_code} {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector (or scalar) `expr` evaluates to now; fails on a query error."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.http.close()


def _k8s_namespace() -> str | None:
    """The namespace deploy/k8s installs into (its base kustomization), if there is one."""
    kustomization = K8S / "base" / "kustomization.yaml"
    return yaml.safe_load(kustomization.read_text()).get("namespace") if kustomization.exists() else None


def prometheus_config(router_http_port: int, workdir: Path) -> Path:
    """deploy/prometheus/prometheus.yml pointed at the test router, with 1 s intervals."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    # Nothing may leave this machine: no remote storage, no Alertmanager.
    assert not {"remote_write", "remote_read", "alerting"} & set(config), "the example config must not send anywhere"
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, scrape_timeout=SCRAPE_INTERVAL,
                            evaluation_interval=SCRAPE_INTERVAL)
    config["rule_files"] = [str(ALERTS)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"glm-image-router", "glm-image-workers"}, jobs
    router = jobs["glm-image-router"]
    assert list(router) == ["job_name", "static_configs"] and len(router["static_configs"]) == 1, router
    router["static_configs"][0]["targets"] = [f"127.0.0.1:{router_http_port}"]
    workers = jobs["glm-image-workers"]
    assert set(workers) == {"job_name", "honor_labels", "http_sd_configs"}, "workers are found only through the router"
    assert workers["http_sd_configs"][0]["url"].endswith("/metrics/targets")
    workers["http_sd_configs"] = [{"url": f"http://127.0.0.1:{router_http_port}/metrics/targets",
                                   "refresh_interval": SCRAPE_INTERVAL}]
    namespace = _k8s_namespace()
    if namespace:
        # As in Kubernetes, where the Prometheus Operator labels every target with its namespace
        # (the KEDA queries select on it).
        router["static_configs"][0]["labels"] = {"namespace": namespace}
        workers["relabel_configs"] = [{"target_label": "namespace", "replacement": namespace}]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def system(tiny_model, tmp_path_factory):
    """Router + AR + DiT worker serving metrics, a DiT worker without, and Prometheus on the router;
    a few requests served (200s, a 400 and a 429) so that request series exist."""
    workdir = tmp_path_factory.mktemp("prometheus")
    stage_config = write_stage_config(workdir, {"router": {"queue_limit_per_stage": QUEUE_LIMIT}})
    cluster = Cluster(model=tiny_model, workdir=workdir, stage_config=stage_config, num_ar=0, num_dit=0,
                      worker_metrics=True)
    prometheus = None
    with cluster:
        cluster.start_worker("ar", "ar-0")
        cluster.start_worker("dit", "dit-0")
        cluster.start_worker("dit", "dit-quiet", metrics=False)
        cluster.wait_for_workers(1, 2, exact=True)
        try:
            prometheus = Prometheus(prometheus_config(cluster.http_port, workdir), workdir)
            prometheus.wait_ready()
            assert generate(cluster.url, seed=1).status_code == 200
            assert generate(cluster.url, seed=2, steps=2).status_code == 200
            bad = generate(cluster.url, seed=3, size="1000x1000")
            assert bad.status_code == 400, bad.text
            refused = generate(cluster.url, seed=4, n=10)
            assert refused.status_code == 429, refused.text
            yield cluster, prometheus
        finally:
            if prometheus is not None:
                prometheus.stop()


def _active_targets(prometheus: Prometheus) -> list[dict]:
    return prometheus.api("targets", state="active")["activeTargets"]


def test_prometheus_finds_every_worker_through_the_router(system):
    cluster, prometheus = system
    with _http() as http:
        response = http.get(f"{cluster.url}/metrics/targets")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    groups = response.json()
    ports = cluster.metrics_ports
    # The worker without metrics is left out; the others come with their stage, id and host.
    assert [(g["labels"]["worker_id"], g["labels"]["stage"], g["targets"]) for g in groups] == [
        ("ar-0", "ar", [f"127.0.0.1:{ports['ar-0']}"]), ("dit-0", "dit", [f"127.0.0.1:{ports['dit-0']}"])]
    assert all(g["labels"]["host"] for g in groups) and all(set(g) == {"targets", "labels"} for g in groups)

    deadline = time.monotonic() + DATA_DEADLINE_S
    while True:
        targets = _active_targets(prometheus)
        if len(targets) == 3 and all(t["health"] == "up" for t in targets):
            break
        assert time.monotonic() < deadline, f"targets not all up: {targets}\n{prometheus.log()[-3000:]}"
        time.sleep(0.5)
    by_job = sorted((t["labels"]["job"], t["labels"].get("worker_id", ""), t["scrapeUrl"]) for t in targets)
    assert by_job == [
        ("glm-image-router", "", f"{cluster.url}/metrics"),
        ("glm-image-workers", "ar-0", f"http://127.0.0.1:{ports['ar-0']}/metrics"),
        ("glm-image-workers", "dit-0", f"http://127.0.0.1:{ports['dit-0']}/metrics"),
    ]
    for target in targets:
        if target["labels"]["job"] == "glm-image-workers":
            assert {"stage", "worker_id", "host"} <= set(target["labels"]), target["labels"]
    # The workers' own series keep their labels as they are (honor_labels), not exported_*.
    series = prometheus.query("glm_worker_jobs_in_flight")
    assert sorted(s["metric"]["worker_id"] for s in series) == ["ar-0", "dit-0"], series
    assert not any(name.startswith("exported_") for s in series for name in s["metric"])


def _wait_for_data(prometheus: Prometheus, queries: list[tuple[str, str]]) -> None:
    """Poll until each query returns at least one series; fail naming those that never do."""
    missing = dict(queries)
    deadline = time.monotonic() + DATA_DEADLINE_S
    while missing and time.monotonic() < deadline:
        missing = {where: expr for where, expr in missing.items() if not prometheus.query(expr)}
        if missing:
            time.sleep(0.5)
    assert not missing, "queries that return no data from the live system:\n" + "\n".join(
        f"  {where}: {expr}" for where, expr in missing.items())


def test_every_dashboard_query_returns_data(system):
    _, prometheus = system
    queries = dashboard_queries()
    assert len(queries) >= 20, queries
    _wait_for_data(prometheus, queries)


def test_every_alert_query_returns_data_and_the_rules_evaluate_healthy(system):
    _, prometheus = system
    rules = alert_rules()
    assert len(rules) >= 6
    # A healthy system fires nothing, so the condition itself is empty: its query must not be.
    _wait_for_data(prometheus, [(f"alert {rule['alert']}", alert_query(rule["expr"])) for rule in rules])
    deadline = time.monotonic() + DATA_DEADLINE_S
    while True:
        loaded = [rule for group in prometheus.api("rules", type="alert")["groups"] for rule in group["rules"]]
        # An unevaluated rule's lastEvaluation is Go's zero time.
        if len(loaded) == len(rules) and not any(rule["lastEvaluation"].startswith("0001") for rule in loaded):
            break
        assert time.monotonic() < deadline, f"alert rules not evaluated: {loaded}"
        time.sleep(0.5)
    assert {rule["name"] for rule in loaded} == {rule["alert"] for rule in rules}
    for rule in loaded:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        assert rule["state"] != "firing", (rule["name"], rule["alerts"])


def test_keda_scaling_queries_return_data_for_both_stages(system):
    _, prometheus = system
    queries = keda_queries()
    stages = {stage for _, query in queries for stage in re.findall(r'stage\s*=\s*"(ar|dit)"', query)}
    assert stages == {"ar", "dit"}, f"deploy/k8s needs a KEDA ScaledObject with a Prometheus trigger per stage: {queries}"
    _wait_for_data(prometheus, queries)


def test_every_shipped_query_reads_documented_metrics():
    documented = set(documented_families())
    queries = dashboard_queries() + [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()] + keda_queries()
    unknown = {(where, name) for where, query in queries for name in metric_names(query) if name not in documented}
    assert not unknown, f"queries read metrics docs/metrics.md does not list: {sorted(unknown)}"


def test_the_dashboard_takes_its_prometheus_from_a_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]


def test_every_alert_is_documented_and_says_what_to_do():
    doc = METRICS_DOC.read_text()
    for rule in alert_rules():
        assert f"| `{rule['alert']}` |" in doc, f"{rule['alert']} is not in the alerts table of docs/metrics.md"
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_alert_rules_and_example_config_pass_promtool():
    promtool = _tool("promtool")
    rules = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in rules.stdout, rules.stdout
    config = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                            timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr


def _stage_gauges(url: str) -> dict[tuple[str, str], float]:
    """(family, stage) -> value of the router's per-stage gauges, scraped now."""
    with _http() as http:
        text = http.get(f"{url}/metrics").text
    found = re.findall(r'^(glm_router_(?:queued_jobs|busy_slots|slots|live_workers))\{stage="(\w+)"\} (\S+)$', text, re.M)
    return {(name, stage): float(value) for name, stage, value in found}


def test_queue_and_slot_gauges_are_exact_under_load_and_return_to_zero(system):
    cluster, prometheus = system
    idle = {("glm_router_queued_jobs", "ar"): 0, ("glm_router_queued_jobs", "dit"): 0,
            ("glm_router_busy_slots", "ar"): 0, ("glm_router_busy_slots", "dit"): 0,
            ("glm_router_slots", "ar"): 1, ("glm_router_slots", "dit"): 2,
            ("glm_router_live_workers", "ar"): 1, ("glm_router_live_workers", "dit"): 2}
    assert _stage_gauges(cluster.url) == idle
    requests = 6
    peak: dict[tuple[str, str], float] = {}
    with ThreadPoolExecutor(requests) as pool:
        # 512x512: about a second of AR each, so the other requests wait for the one AR slot.
        futures = [pool.submit(generate, cluster.url, seed=100 + i, size="512x512") for i in range(requests)]
        while not all(f.done() for f in futures):
            gauges = _stage_gauges(cluster.url)
            for stage in ("ar", "dit"):
                busy, slots = gauges["glm_router_busy_slots", stage], gauges["glm_router_slots", stage]
                assert 0 <= busy <= slots, gauges
                assert 0 <= gauges["glm_router_queued_jobs", stage] + busy <= requests, gauges
            for key, value in gauges.items():
                peak[key] = max(peak.get(key, 0), value)
            time.sleep(0.05)
        assert [f.result().status_code for f in futures] == [200] * requests
    assert peak["glm_router_queued_jobs", "ar"] >= 2, peak  # several requests waited for the AR slot
    assert peak["glm_router_busy_slots", "ar"] == 1 and peak["glm_router_busy_slots", "dit"] >= 1, peak
    # Every job has finished once every response is in: back to idle at once, not after a decay.
    assert _stage_gauges(cluster.url) == idle
    # Prometheus saw the queue too, and sees it empty now.
    _wait_for_data(prometheus, [("AR queue peak", 'max_over_time(glm_router_queued_jobs{stage="ar"}[5m]) >= 1'),
                                ("AR queue empty", 'glm_router_queued_jobs{stage="ar"} == 0')])


def _loss_counts(url: str) -> dict[tuple[str, str], float]:
    with _http() as http:
        text = http.get(f"{url}/metrics").text
    found = re.findall(r'^glm_router_worker_losses_total\{reason="(\w+)",stage="(\w+)"\} (\S+)$', text, re.M)
    return {(stage, reason): float(value) for reason, stage, value in found}


def test_a_killed_worker_is_counted_as_lost_and_leaves_the_targets(system):
    """Runs last in this module: it takes a worker away."""
    cluster, _ = system
    before = _loss_counts(cluster.url)
    assert set(before) == {(s, r) for s in ("ar", "dit") for r in ("timeout", "left", "restarted", "unreachable")}
    assert sum(before.values()) == 0, before
    cluster.kill("dit-0")  # SIGKILL: no goodbye
    cluster.wait_for_workers(1, 1, exact=True, timeout=60)
    after = _loss_counts(cluster.url)
    lost = {key: after[key] - before[key] for key in after if after[key] != before[key]}
    # Dropped once, by timeout or by the first send that found its connection gone; not "left".
    assert len(lost) == 1 and list(lost.values()) == [1], lost
    assert next(iter(lost))[0] == "dit" and next(iter(lost))[1] in ("timeout", "unreachable"), lost
    with _http() as http:
        targets = http.get(f"{cluster.url}/metrics/targets").json()
    assert [g["labels"]["worker_id"] for g in targets] == ["ar-0"]
    gauges = _stage_gauges(cluster.url)
    assert gauges["glm_router_slots", "dit"] == 1 and gauges["glm_router_live_workers", "dit"] == 1, gauges


def _uncommented_authorization(config_text: str) -> str:
    """The example config with its commented-out `authorization:` blocks (for --protect-metrics) turned on."""
    lines, inside = [], False
    for line in config_text.splitlines():
        match = re.fullmatch(r"(\s*)# (authorization:.*|  \S.*)", line)
        if match and (match.group(2).startswith("authorization:") or inside):
            inside = True
            lines.append(match.group(1) + match.group(2))
            continue
        inside = False
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_the_example_authorization_reaches_a_router_with_protected_metrics(tiny_model, tmp_path):
    """With --protect-metrics, the commented `authorization` blocks of deploy/prometheus/prometheus.yml, turned
    on, let a real Prometheus scrape the router and read /metrics/targets. Inside http_sd_configs Prometheus
    2.42 sends the bare key (401) unless the block says `type: Bearer`, which docs/http_security.md says."""
    key = "prometheus-scrape-key"
    key_file = tmp_path / "api-key"
    key_file.write_text(key)
    cluster = Cluster(model=tiny_model, workdir=tmp_path, num_ar=0, num_dit=0, api_keys=(key,))
    cluster.start_router(extra=["--protect-metrics"])
    prometheus = None
    try:
        cluster.wait_for_http()
        with _http() as http:
            assert http.get(f"{cluster.url}/metrics/targets").status_code == 401  # protected indeed
        config = yaml.safe_load(_uncommented_authorization(PROMETHEUS_CONFIG.read_text()))
        config.pop("rule_files")
        config["global"].update(scrape_interval=SCRAPE_INTERVAL, scrape_timeout=SCRAPE_INTERVAL)
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        router, workers = jobs["glm-image-router"], jobs["glm-image-workers"]
        sd = workers["http_sd_configs"][0]
        assert router["authorization"]["type"] == sd["authorization"]["type"] == "Bearer"
        router["static_configs"][0]["targets"] = [f"127.0.0.1:{cluster.http_port}"]
        router["authorization"]["credentials_file"] = sd["authorization"]["credentials_file"] = str(key_file)
        sd.update(url=f"{cluster.url}/metrics/targets", refresh_interval=SCRAPE_INTERVAL)
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        prometheus = Prometheus(path, tmp_path)
        prometheus.wait_ready()

        def own_metric(name: str, **labels: str) -> float:
            text = prometheus.http.get(f"{prometheus.url}/metrics").text
            selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
            found = re.search(rf"^{name}(?:\{{{selector}[^}}]*\}})? (\S+)$", text, re.M)
            return float(found.group(1)) if found else 0.0

        deadline = time.monotonic() + DATA_DEADLINE_S
        while time.monotonic() < deadline:
            up = prometheus.query('up{job="glm-image-router"}')
            refreshed = own_metric("prometheus_sd_refresh_duration_seconds_count", mechanism="http")
            if up and up[0]["value"][1] == "1" and refreshed >= 3:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no scrape of the router or no refresh of its targets:\n{prometheus.log()[-3000:]}")
        assert own_metric("prometheus_sd_http_failures_total") == 0, prometheus.log()[-3000:]
        assert "401" not in prometheus.log()
        with _http() as http:
            failures = dict(re.findall(r'^glm_router_http_auth_failures_total\{reason="(\w+)"\} (\S+)$',
                                       http.get(f"{cluster.url}/metrics", headers=cluster.auth_headers).text, re.M))
        assert failures == {"missing": "1.0", "malformed": "0.0", "invalid": "0.0"}, failures  # the check above only
    finally:
        if prometheus is not None:
            prometheus.stop()
        cluster.stop()
