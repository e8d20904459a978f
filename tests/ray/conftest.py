"""Ray tests share the session's loopback cluster (``ray_cluster`` in tests/conftest.py, which
also sets Ray's loopback environment before Ray is imported); skipped where Ray is absent."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")
