"""Several routers sharing one pool of workers, as the Kubernetes base runs them: real processes.

The bug this guards: two routers, one AR worker of capacity 1 and one DiT worker, 8 concurrent
requests split over the routers gave four `502 ar stage failed ... workers kept refusing`. Each
router counted only its own jobs and re-dispatched refused jobs at once. Now the worker arbitrates
its slots (refused routers wait in line for a SlotOffer) and a refusal is back-pressure: every
request answers 200, and no worker ever runs more jobs than its capacity.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from harness.local_cluster import Cluster

pytestmark = pytest.mark.quick

_JOB_EVENT = re.compile(r"job (\S+) (started|done in|cancelled after)")


def max_concurrent_jobs(log: str) -> int:
    """The most jobs a worker ran at once, from its own log lines."""
    running: set[str] = set()
    most = 0
    for job_id, event in _JOB_EVENT.findall(log):
        if event == "started":
            running.add(job_id)
            most = max(most, len(running))
        else:
            running.discard(job_id)
    return most


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)], ids=["2-routers", "3-routers"])
def fleet(request, tiny_model, tmp_path_factory):
    """`n` routers and one AR plus one DiT worker (capacity 1 each) joined to all of them."""
    n = request.param
    workdir = tmp_path_factory.mktemp(f"fleet{n}")
    routers = [Cluster(model=tiny_model, workdir=workdir / f"r{i}", num_ar=0, num_dit=0, worker_metrics=True)
               for i in range(n)]
    for router in routers:
        router.workdir.mkdir()
    first = routers[0]
    others = [arg for router in routers[1:] for arg in ("--router", router.bus_address)]
    try:
        for router in routers:
            router.start_router()
        first.start_worker("ar", "ar-0", extra=others)
        first.start_worker("dit", "dit-0", extra=others)
        for router in routers:
            router.wait_for_http()
            router.wait_for_workers(1, 1)
        yield routers
    finally:
        for router in routers:
            router.stop()


def test_contention_between_routers_queues_instead_of_failing(fleet):
    first = fleet[0]
    requests = 4 * len(fleet)

    def generate(i: int) -> httpx.Response:
        router = fleet[i % len(fleet)]
        return httpx.post(f"{router.url}/v1/images/generations", timeout=180,
                          json={"prompt": f"a lighthouse {i}", "size": "256x256", "seed": i,
                                "num_inference_steps": 2})

    with ThreadPoolExecutor(requests) as pool:
        responses = list(pool.map(generate, range(requests)))
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * requests, [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    for name in ("ar-0", "dit-0"):
        assert max_concurrent_jobs(first.procs[name].log()) == 1, f"{name} ran more jobs than its capacity"
    # The routers did contend (the workers refused some jobs for capacity) and every refusal was
    # absorbed as back-pressure, counted where an operator looks for it.
    refused = 0.0
    for name in ("ar-0", "dit-0"):
        port = first.metrics_ports[name]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        refused += metric_value(text, "glm_worker_jobs_total", outcome="overloaded")
    assert refused > 0, "no contention happened: the test proves nothing"
    # Every router took part (none starved).
    for router in fleet:
        text = httpx.get(f"{router.url}/metrics", timeout=10).text
        assert metric_value(text, "glm_router_images_total", outcome="ok") >= 4
        assert metric_value(text, "glm_router_images_total", outcome="failed") == 0
