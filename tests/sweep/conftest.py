"""A loopback Ray cluster for the Tune sweeps: a 0-CPU head and two 1-CPU nodes on 127.0.0.1
(trainkit.bench.loopback, the cluster tests/ray and the benches use), so two one-worker
trials run at once, each on its own raylet."""

from __future__ import annotations

import os

import pytest

# Before Ray is imported anywhere: loopback only, no token auth, no usage reporting.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def tune_cluster():
    pytest.importorskip("ray.tune")
    from trainkit.bench.loopback import LoopbackCluster

    cluster = LoopbackCluster(workers=2)
    try:
        yield cluster
    finally:
        cluster.shutdown()
