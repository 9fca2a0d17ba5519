"""docs/metrics.md lists exactly the metric families the processes export, and they follow the
naming conventions: scraped from a live router and workers, and the launcher's registry."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client import generate_latest

from harness.local_cluster import Cluster, generate
from launch.supervisor import SupervisorMetrics
from tests.metrics_catalogue import ROOT, Family, documented_families, exported_families

PREFIXES = {"router": "glm_router_", "worker": "glm_worker_", "supervisor": "glm_supervisor_"}
# With an API key the router exports its auth families too (/metrics stays open without --protect-metrics).
API_KEY = "catalogue-test-key"


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory) -> dict[str, dict[str, Family]]:
    """Families by process kind, scraped after one plain and one streamed request (so that the
    families labelled per request have samples, hence known labels)."""
    cluster = Cluster(model=tiny_model, workdir=tmp_path_factory.mktemp("catalogue"), worker_metrics=True,
                      api_keys=(API_KEY,))
    with cluster, httpx.Client(timeout=30, trust_env=False) as http:
        assert generate(cluster.url, seed=1, headers=cluster.auth_headers).status_code == 200
        streamed = http.post(f"{cluster.url}/v1/images/generations", headers=cluster.auth_headers,
                             json={"prompt": "a cube", "size": "256x256", "num_inference_steps": 1, "seed": 2,
                                   "stream": True})
        assert streamed.status_code == 200 and "image_generation.completed" in streamed.text
        workers: dict[str, Family] = {}
        for name, port in sorted(cluster.metrics_ports.items()):
            workers.update(exported_families(http.get(f"http://127.0.0.1:{port}/metrics").text))
        return {
            "router": exported_families(http.get(f"{cluster.url}/metrics").text),
            "worker": workers,
            "supervisor": exported_families(generate_latest(SupervisorMetrics().registry).decode()),
        }


def test_every_exported_family_is_documented_and_every_documented_one_exported(exported):
    documented = documented_families()
    everything = {name: family for families in exported.values() for name, family in families.items()}
    undocumented = sorted(set(everything) - set(documented))
    assert not undocumented, f"exported but not listed in docs/metrics.md: {undocumented}"
    missing = sorted(set(documented) - set(everything))
    assert not missing, f"listed in docs/metrics.md but exported by no process: {missing}"
    for name, family in everything.items():
        assert family.type == documented[name].type, f"{name} is a {family.type}, docs/metrics.md says {documented[name].type}"
        if family.labels is not None:
            assert family.labels == documented[name].labels, \
                f"{name} has labels {sorted(family.labels)}, docs/metrics.md says {sorted(documented[name].labels)}"


def test_the_autoscaling_and_churn_families_have_both_stages_from_the_start(exported):
    router = exported["router"]
    for name in ("glm_router_queued_jobs", "glm_router_busy_slots", "glm_router_slots", "glm_router_live_workers",
                 "glm_router_worker_registrations_total", "glm_router_worker_losses_total"):
        assert "stage" in (router[name].labels or ()), name
    assert exported["worker"]["glm_worker_denoising_steps_total"].labels == {"stage", "worker_id"}


def test_names_follow_the_prometheus_conventions(exported):
    for kind, families in exported.items():
        for name, family in families.items():
            assert name.startswith(PREFIXES[kind]), f"a {kind} family is named {name}: use the {PREFIXES[kind]} prefix"
            assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
            assert (family.type == "counter") == name.endswith("_total"), f"{name}: only counters end in _total"
            if family.type == "histogram" or re.search(r"_(seconds|bytes)(_|$)", name):
                bare = name.removesuffix("_total")
                assert bare.endswith(("_seconds", "_bytes")), f"{name}: the unit goes at the end of the name"
            body = f"_{name.removeprefix(PREFIXES[kind]).removesuffix('_total')}_"
            for label in family.labels or ():
                assert f"_{label}_" not in body, f"{name} repeats its label {label!r} in its name"


def test_every_worker_refusal_reason_is_exported_at_zero_and_documented():
    """Each reason of glm_router_workers_refused is a series (0) from the start, so a rate or an alert on
    `curve_unknown_key` works before the first refusal, and docs/metrics.md names each one."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families

    from common import bus_security
    from router.core.metrics import RouterMetrics

    reasons = {"config_mismatch"} | {value for name, value in vars(bus_security).items() if name.startswith("REFUSED_")}
    assert len(reasons) == 5, reasons
    registry = CollectorRegistry()
    RouterMetrics(registry)
    exported = {sample.labels["reason"]: sample.value
                for family in text_string_to_metric_families(generate_latest(registry).decode())
                if family.name == "glm_router_workers_refused" for sample in family.samples
                if sample.name == "glm_router_workers_refused_total"}
    assert exported == dict.fromkeys(reasons, 0.0)
    row = next(line for line in (ROOT / "docs" / "metrics.md").read_text().splitlines()
               if line.startswith("| `glm_router_workers_refused_total` |"))
    assert {reason for reason in reasons if f"`{reason}`" in row} == reasons, row
