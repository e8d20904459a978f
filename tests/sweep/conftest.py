"""The Tune sweeps run on the session's loopback Ray cluster (``ray_cluster`` in tests/conftest.py:
a 0-CPU head and 1-CPU nodes on 127.0.0.1), with two worker nodes, so two one-worker trials run
at once, each on its own raylet."""

from __future__ import annotations

import pytest


@pytest.fixture
def tune_cluster(ray_cluster):
    pytest.importorskip("ray.tune")
    ray_cluster.ensure(2)
    return ray_cluster
