"""Prometheus HTTP service discovery: the router tells Prometheus where every worker's metrics are.

Prometheus is pointed at the router only (a static scrape of the router, plus `http_sd_configs`
on GET /metrics/targets) and finds every worker from there, wherever it runs. Each worker
announces its scrape address in its registration (`WorkerInfo.metrics_address`: --metrics-port,
--metrics-advertise); workers that serve no metrics are left out. The format is Prometheus's
https://prometheus.io/docs/prometheus/latest/http_sd/ : a JSON list of target groups.
"""

from __future__ import annotations

from typing import Iterable

from pydantic import BaseModel

from common.protocol import WorkerInfo


class ScrapeTargetGroup(BaseModel):
    """One HTTP SD target group: one worker, labelled so its series say which worker and stage."""

    targets: list[str]
    labels: dict[str, str]


def scrape_target_groups(workers: Iterable[WorkerInfo]) -> list[ScrapeTargetGroup]:
    """A target group per worker that announced a metrics address, in a stable order (stage, id).

    Draining workers stay listed: they still run jobs, and their last counts should be scraped."""
    groups = [
        ScrapeTargetGroup(
            targets=[info.metrics_address],
            labels={"stage": info.stage.value, "worker_id": info.worker_id, "host": info.host},
        )
        for info in sorted(workers, key=lambda info: (info.stage.value, info.worker_id))
        if info.metrics_address
    ]
    return groups
