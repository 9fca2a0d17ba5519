"""What the metrics tests read: the catalogue in docs/metrics.md, scraped expositions, and every
PromQL query the deployment ships (Grafana dashboard, alert rules, KEDA ScaledObjects)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
METRICS_DOC = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "glm-image.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
K8S = ROOT / "deploy" / "k8s"

# A catalogue row: | `name` | type | `label`, `label` | meaning |
_ROW = re.compile(r"^\| `(glm_[a-z0-9_]+)` \| (counter|gauge|histogram) \|([^|]*)\|", re.MULTILINE)
# Grafana's built-in interval variables, as a dashboard at its default range would see them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}
# `<query> <comparison> <threshold>`, the shape every alert rule has (alerts.yaml says so).
_COMPARISON = re.compile(r"^(?P<query>.+?)\s*(?:==|!=|>=|<=|>|<)\s*(?P<threshold>-?[0-9.]+(?:e[+-]?[0-9]+)?)\s*$",
                         re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Family:
    """A metric family: its name as scraped (counters with `_total`), type and label names."""

    name: str
    type: str
    labels: frozenset[str] | None  # None: exported without samples, so its labels are unknown


def documented_families() -> dict[str, Family]:
    """The families docs/metrics.md lists, by name as scraped."""
    families = {}
    for name, kind, labels in _ROW.findall(METRICS_DOC.read_text()):
        assert name not in families, f"{name} is listed twice in {METRICS_DOC}"
        families[name] = Family(name, kind, frozenset(re.findall(r"`([a-z_]+)`", labels)))
    return families


def exported_families(exposition: str) -> dict[str, Family]:
    """The families of a Prometheus text exposition, by name as scraped.

    prometheus_client's `<name>_created` companions of counters and histograms belong to their
    family and are left out."""
    parsed = {family.name: family for family in text_string_to_metric_families(exposition)}
    families = {}
    for name, family in parsed.items():
        base = name.removesuffix("_created")
        if name != base and family.type == "gauge" and parsed.get(base) and parsed[base].type in ("counter", "histogram"):
            continue
        labels = {label for sample in family.samples for label in sample.labels if label != "le"}
        scraped = f"{name}_total" if family.type == "counter" else name
        families[scraped] = Family(scraped, family.type, frozenset(labels) if family.samples else None)
    return families


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every target of every panel of the dashboard, Grafana variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))  # rows may nest panels
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, f"panel {panel['title']!r}: unknown Grafana variable in {expr}"
                queries.append((f"dashboard panel {panel['title']!r} target {target['refId']}", expr))

    walk(dashboard["panels"])
    return queries


def alert_rules() -> list[dict]:
    """The alerting rules of alerts.yaml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alert_query(expr: str) -> str:
    """The query of an alert expression `<query> <comparison> <threshold>` (what to graph)."""
    match = _COMPARISON.match(expr.strip())
    assert match, f"alert expression is not `<query> <comparison> <threshold>`: {expr}"
    return match["query"]


def keda_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every Prometheus trigger of every KEDA ScaledObject under deploy/k8s."""
    queries = []
    for path in sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "ScaledObject" \
                    or not str(doc.get("apiVersion", "")).startswith("keda.sh/"):
                continue
            for trigger in doc.get("spec", {}).get("triggers", []):
                if trigger.get("type") == "prometheus":
                    where = f"{path.relative_to(ROOT)} ScaledObject {doc['metadata']['name']!r}"
                    queries.append((where, trigger["metadata"]["query"]))
    return queries


def metric_names(query: str) -> set[str]:
    """The glm_* metric names a query reads, as families are named when scraped."""
    names = set()
    for name in re.findall(r"\b(glm_[a-z0-9_]+)", query):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and not name.endswith("_total"):
                name = name.removesuffix(suffix)
                break
        names.add(name)
    return names
