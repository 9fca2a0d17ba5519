"""The local-cluster harness (harness/local_cluster.py): a start that fails leaves no process behind."""

from __future__ import annotations

import os

import pytest

from harness.local_cluster import Cluster, Proc

pytestmark = pytest.mark.quick


def gone(proc: Proc) -> bool:
    """Neither the process nor anything else in its process group is left."""
    if proc.alive():
        return False
    try:
        os.killpg(proc.popen.pid, 0)  # signal 0: only asks whether the group exists
    except ProcessLookupError:
        return True
    return False


def test_a_start_that_times_out_in_a_with_block_stops_what_it_started(tiny_model, tmp_path):
    # No worker loads the model in half a second: start() times out with all three processes running.
    cluster = Cluster(model=tiny_model, workdir=tmp_path, start_timeout=0.5)
    with pytest.raises(TimeoutError):
        with cluster:
            pass
    assert set(cluster.procs) == {"router", "ar-0", "dit-0"}
    assert all(gone(p) for p in cluster.procs.values()), cluster.logs_tail()


def test_a_worker_that_cannot_start_fails_start_and_stops_the_rest(tmp_path):
    cluster = Cluster(model=tmp_path / "no-such-model", workdir=tmp_path, num_ar=1, num_dit=0)
    with pytest.raises(RuntimeError, match="ar-0 exited with"):
        cluster.start()
    assert cluster.procs["ar-0"].popen.returncode not in (0, None)
    assert all(gone(p) for p in cluster.procs.values()), cluster.logs_tail()
