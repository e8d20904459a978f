"""Shared fixtures: real object-store servers on 127.0.0.1 and a fault-injecting proxy.

* ``s3_server``  (session): moto's S3 server; env ``AWS_*`` and ``FSSPEC_S3_ENDPOINT_URL`` set.
  ``.endpoint``, ``.storage_options`` (s3fs kwargs), ``.bucket(name) -> "s3://name"``.
* ``gcs_server`` (session): fake-gcs-server; env ``STORAGE_EMULATOR_HOST`` set.
  ``.endpoint``, ``.storage_options`` (gcsfs kwargs), ``.bucket(name) -> "gs://name"``.
* ``fault_proxy`` (function): factory ``fault_proxy(upstream=None, **faults) -> FaultProxy``
  in front of the S3 server by default; every proxy made is stopped at teardown.
* ``s3_url`` / ``gcs_url``: a fresh ``s3://bucket/prefix`` / ``gs://bucket/prefix`` per test.

Markers that bound the default suite (``--runslow`` runs everything):

* ``slow``: soak and secondary proofs, skipped by default.
* ``rotate(group)``: cases that prove the same contract on different members of a matrix
  (strategies × stores, readers × stores). By default one case per group runs, picked by the
  rotation number (env ``TRAINKIT_TEST_ROTATION``, else the day of the year), so successive CI
  days cover the whole matrix while each run stays bounded. The header prints the number; rerun a
  failure with the same one.
"""

from __future__ import annotations

import datetime
import os
import uuid
from collections import defaultdict

import pytest

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# Before Ray is imported anywhere: loopback only, no token auth, no usage reporting.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # makes 127.0.0.1 stick (trainkit.launch.ray.session.pin_loopback)
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from servers import az_url, azurite_server  # noqa: E402,F401  (Azure Blob on Azurite, one per session)
from trainkit.testing import FaultProxy, GCSServer, S3Server  # noqa: E402


def pytest_addoption(parser):
    try:
        parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")
    except ValueError:
        pass


def _rotation() -> int:
    value = os.environ.get("TRAINKIT_TEST_ROTATION")
    return int(value) if value else datetime.date.today().timetuple().tm_yday


def pytest_configure(config):
    config.addinivalue_line("markers", "rotate(group): one case per group runs by default, in rotation")


def pytest_report_header(config):
    if not config.getoption("--runslow", default=False):
        return f"trainkit: rotation {_rotation()} (TRAINKIT_TEST_ROTATION; --runslow runs every case)"
    return None


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow", default=False):
        return
    named = any("::" in arg for arg in config.args)  # a case asked for by name runs, whatever the rotation
    skip = pytest.mark.skip(reason="slow: use --runslow")
    groups: dict[str, list[pytest.Item]] = defaultdict(list)
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
        elif not named and (mark := item.get_closest_marker("rotate")) is not None:
            groups[mark.args[0]].append(item)
    rotation = _rotation()
    for group, members in groups.items():
        chosen = sorted(members, key=lambda i: i.nodeid)[rotation % len(members)]
        for item in members:
            if item is not chosen:
                item.add_marker(pytest.mark.skip(
                    reason=f"rotate({group}): rotation {rotation} runs {chosen.name}; --runslow runs all"))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Processes a test left behind are killed once every fixture is torn down: a non-daemon
    child (``torch.multiprocessing``'s workers are) would otherwise keep the interpreter from
    exiting after the summary, and the CI run from ever finishing."""
    import psutil

    left, names = [], []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            if "multiprocessing.resource_tracker" in cmdline:  # leaves on its own with this process
                continue
            proc.kill()
        except psutil.Error:
            continue
        left.append(proc)
        names.append(f"{proc.pid} {cmdline[:120]}")
    psutil.wait_procs(left, timeout=10)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and names:
        reporter.write_line(f"trainkit: killed {len(names)} process(es) the tests left running:", yellow=True)
        for name in names:
            reporter.write_line(f"  {name}")


@pytest.fixture(scope="session")
def ray_cluster():
    """One loopback Ray cluster for tests/ray and tests/sweep (each start costs seconds): a 0-CPU
    head (GCS, drivers, Ray Train's controllers) and 1-CPU raylets as worker nodes, which tests
    remove and add; each test asks for the nodes it needs with ``ray_cluster.ensure(n)``."""
    pytest.importorskip("ray")
    from trainkit.bench.loopback import LoopbackCluster

    cluster = LoopbackCluster()
    try:
        cluster.ensure(2)
        yield cluster
    finally:
        cluster.shutdown()


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
