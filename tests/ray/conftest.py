"""A Ray cluster on 127.0.0.1 shared by every Ray test (start-up costs seconds).

Several raylets on this one machine play the nodes: the head (0 CPUs: it hosts the GCS,
the drivers and Ray Train's controllers) plus 1-CPU worker nodes that tests remove and add.
Each test asks for the worker nodes it needs with ``ray_cluster.ensure(n)``.
"""

from __future__ import annotations

import os

import pytest

# Before Ray is imported anywhere: loopback only, no token auth, no usage reporting.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # makes 127.0.0.1 stick (see trainkit.launch.ray.session.pin_loopback)
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

pytest.importorskip("ray")

from ray_helpers import LoopbackCluster  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    cluster = LoopbackCluster()
    try:
        cluster.ensure(2)
        yield cluster
    finally:
        cluster.shutdown()


