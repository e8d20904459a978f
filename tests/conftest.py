"""Shared fixtures: real object-store servers on 127.0.0.1 and a fault-injecting proxy.

* ``s3_server``  (session): moto's S3 server; env ``AWS_*`` and ``FSSPEC_S3_ENDPOINT_URL`` set.
  ``.endpoint``, ``.storage_options`` (s3fs kwargs), ``.bucket(name) -> "s3://name"``.
* ``gcs_server`` (session): fake-gcs-server; env ``STORAGE_EMULATOR_HOST`` set.
  ``.endpoint``, ``.storage_options`` (gcsfs kwargs), ``.bucket(name) -> "gs://name"``.
* ``fault_proxy`` (function): factory ``fault_proxy(upstream=None, **faults) -> FaultProxy``
  in front of the S3 server by default; every proxy made is stopped at teardown.
* ``s3_url`` / ``gcs_url``: a fresh ``s3://bucket/prefix`` / ``gs://bucket/prefix`` per test.
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from trainkit.testing import FaultProxy, GCSServer, S3Server  # noqa: E402


def pytest_addoption(parser):
    try:
        parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")
    except ValueError:
        pass


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow", default=False):
        return
    skip = pytest.mark.skip(reason="slow: use --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server():
    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server():
    with GCSServer() as server:
        yield server


@pytest.fixture
def s3_url(s3_server):
    """A fresh prefix in a shared test bucket."""
    return f"{s3_server.bucket('trainkit-test')}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def gcs_url(gcs_server):
    return f"{gcs_server.bucket('trainkit-test')}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fault_proxy(request):
    """Factory: ``fault_proxy(upstream=None, p_503=..., p_reset=..., latency=..., schedule=...)``.

    ``upstream`` defaults to the session S3 server. The proxy is started; use
    ``proxy.endpoint`` as the client's endpoint_url. Stopped at teardown.
    """
    made: list[FaultProxy] = []

    def make(upstream: str | None = None, **faults) -> FaultProxy:
        if upstream is None:
            upstream = request.getfixturevalue("s3_server").endpoint
        proxy = FaultProxy(upstream, **faults).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()
