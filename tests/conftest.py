"""Shared fixtures (the tiny model, one healthy cluster per test process), the tiers and the parallel layout.

Tiers: a module marked `quick` (`pytestmark = pytest.mark.quick`) belongs to the quick tier, except
its tests marked `slow`; `./tests/run_tests.sh --quick` runs `-m "quick and not slow"`, the plain
command everything (README, "Tests", says what each tier proves).

Parallel runs (pytest-xdist, `-n 3 --dist loadscope`, as run_tests.sh does): every module is one
group, run whole by one worker, so its module-scoped fixtures (a cluster, a vLLM engine) start
once. Modules that share machine-wide state (network namespaces, /etc/netns, the 198.18.0.0/15
addresses) form one group so they never run at the same time. Groups start heaviest first
(GROUP_COST), and a process still busy is topped up with the lightest group left, so the processes
finish at about the same time. (xdist's own `loadgroup` cannot do this with pytest 9.2: the group
suffix it writes into `item._nodeid` no longer reaches `item.nodeid`.)

Interrupting the run (Ctrl-C, SIGTERM) tears the fixtures down, so every cluster stops; the
processes a cluster starts also get SIGTERM from the kernel if this process dies without teardown
(harness/local_cluster.py).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from harness.local_cluster import Cluster
from model_presets.tiny_model import build_tiny_model

# The shared assert helpers get pytest's detailed failure messages too (before any test imports them).
pytest.register_assert_rewrite("tests.helpers")

ROOT = Path(__file__).resolve().parent.parent

# Modules that must not run beside each other, by group name.
SHARED_GROUPS = {
    # Network namespaces, a bridge on 198.18.0.0/15 and /etc/netns/NAME/hosts.
    "netns": ("test_k8s_cluster", "test_bus_encryption", "test_bus_hardening", "test_router_discovery"),
}
GROUP_OF_MODULE = {module: group for group, modules in SHARED_GROUPS.items() for module in modules}

# Rough seconds each group took in a full run (3 processes on 2 cores, AVX2 kernels; the junit times
# summed per group): the order groups are handed to the workers, heaviest first. A group missing
# here runs after these (its cost is taken as 0): add a new module here if it takes more than ~30 s.
GROUP_COST = {
    # The container image is built before the suite (tests/run_tests.sh): here it is only run.
    "test_real_shape": 525,
    "netns": 195,
    "test_vllm_engine": 125,
    "test_offline": 120,
    "test_dit_speedups": 100,
    "test_chaos": 70,
    "test_reliability": 70,
    "test_api_keys": 70,
    "test_bus_security": 70,
    "test_e2e": 65,
    "test_engines_e2e": 65,
    "test_random_init": 65,
    "test_launcher": 55,
    "test_interrupt": 50,
    "test_prometheus": 45,
    "test_multi_router": 45,
    "test_container_image": 40,
    "test_streaming": 40,
    "test_bench_smoke": 35,
    "test_playground": 30,
    "test_lora": 30,
    "test_seeds_and_cache": 30,
    "test_k8s_manifests": 25,
    "test_worker_probes": 25,
    "test_cli": 20,
    "test_bad_input": 15,
    "test_slow_clients": 15,
    "test_openapi_fuzz": 15,
    "test_client": 15,
    "test_metrics_catalogue": 10,
    "test_hostile_http": 10,
}


def _group_of_module(path: str) -> str:
    module = Path(path.split("::", 1)[0]).stem
    return GROUP_OF_MODULE.get(module, module)


def _group(item: pytest.Item) -> str:
    return _group_of_module(item.nodeid)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the groups heaviest first (stable within a group): the order xdist hands them out."""
    position = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (-GROUP_COST.get(_group(item), 0), _group(item), position[id(item)]))


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadscope` with our groups as the scopes, handed out in collection order."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group_of_module(nodeid)

        def _assign_work_unit(self, node) -> None:
            # xdist tops a process up while its last two tests still run (a worker needs its next
            # test in hand). Topping up with the heaviest group left would queue that group behind a
            # long test while the other processes run dry; the lightest group ends about when the
            # long test does. An idle process takes the heaviest.
            if self._pending_of(self.assigned_work.get(node, {})):
                self.workqueue.move_to_end(next(reversed(self.workqueue)), last=False)
            super()._assign_work_unit(node)

    config.option.loadscopereorder = False  # keep GROUP_COST's order, not "most tests first"
    return ModuleGroupScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM (a CI timeout, `kill`) ends the run like Ctrl-C: pytest then tears the fixtures down,
    # and with them every cluster they started.
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)
    # A run started in the background (`tests/run_tests.sh &` in a script) inherits SIGINT ignored, and
    # so would every process it starts: a Python started with SIGINT ignored never raises
    # KeyboardInterrupt, and the tests that press Ctrl-C on a child would wait in vain. With a handler
    # here, Ctrl-C works in this process and exec gives the children the default, as in a terminal.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny random-weight GLM-Image; cached under models/ (gitignored), rebuilt if absent."""
    path = Path(os.environ.get("GLM_TINY_MODEL", ROOT / "models" / "tiny-glm-image"))
    return build_tiny_model(path)


@pytest.fixture(scope="session")
def cluster(tiny_model, tmp_path_factory):
    """Router + 1 AR + 1 DiT worker on the tiny model, shared by every module of this test process
    that needs only a healthy cluster: tests using it must not stop, kill or reconfigure it."""
    with Cluster(model=tiny_model, workdir=tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="session")
def no_dit(tiny_model, tmp_path_factory):
    """A router with an AR worker and no DiT worker: a request fails in the DiT stage, after a
    stream opened. Shared like `cluster`."""
    from tests.helpers import cluster_with

    with cluster_with(tiny_model, tmp_path_factory, "no-dit", {"router": {"no_worker_grace_s": 0.5}}, num_dit=0) as c:
        yield c
