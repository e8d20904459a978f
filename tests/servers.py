"""Test-side names for the loopback servers (implementation lives in trainkit.testing).

``azurite_server`` (session) and ``az_url`` (a fresh ``az://container/prefix`` per test) are
fixtures: import them into a conftest or test module that uses Azure Blob.
"""

import uuid

import pytest

from trainkit.testing.faultproxy import FaultProxy, every, fail_first
from trainkit.distributed import free_port
from trainkit.testing.servers import AzuriteServer, GCSServer, S3Server

__all__ = ["AzuriteServer", "FaultProxy", "GCSServer", "S3Server", "az_url", "azurite_server", "every", "fail_first",
           "free_port"]


@pytest.fixture(scope="session")
def azurite_server():
    """Azurite's blob service; env ``AZURE_STORAGE_CONNECTION_STRING`` set (adlfs reads it)."""
    with AzuriteServer() as server:
        yield server


@pytest.fixture
def az_url(azurite_server):
    """A fresh prefix in a shared test container."""
    return f"{azurite_server.bucket('trainkit-test')}/{uuid.uuid4().hex[:12]}"
