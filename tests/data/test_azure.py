"""Azure Blob through adlfs against Azurite: credentials as users pass them, and which of
adlfs's errors trainkit's retry repeats."""

from __future__ import annotations

import adlfs
import pytest

from trainkit import storage
from trainkit.distributed import free_port
from trainkit.testing import fail_first
from trainkit.testing.servers import AZURITE_KEY, azurite_connection_string


def test_credentials_from_the_environment_or_the_options(azurite_server, az_url, storage_options, monkeypatch):
    path = az_url.removeprefix("az://") + "/hello.bin"
    fs, p = storage.filesystem(az_url + "/hello.bin")  # AZURE_STORAGE_CONNECTION_STRING, set by the fixture
    fs.pipe_file(p, b"hello" * 1000)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "")
    storage_options({"az": azurite_server.storage_options})  # storage.az.connection_string=...
    for url in (f"az://{path}", f"abfs://{path}", f"abfss://{path}"):  # one set of options for all three
        fs, p = storage.filesystem(url)
        assert fs.cat_file(p, start=5, end=10) == b"hello" and fs.size(p) == 5000, url
    storage.check_options({"az": azurite_server.storage_options})


def test_which_errors_are_retried(azurite_server, az_url, fault_proxy, monkeypatch):
    """A 503 (SlowDown) and a refused connection are transient; a missing blob and a wrong key
    are not (retrying them eight times would only delay the error)."""
    from azure.storage.blob.aio import ExponentialRetry

    plain = ExponentialRetry.__init__  # the SDK's own retries off: the error is what it would give up with
    monkeypatch.setattr(ExponentialRetry, "__init__", lambda self, **kw: plain(self, **{**kw, "retry_total": 0}))
    path = az_url.removeprefix("az://") + "/x.bin"
    azurite_server.filesystem().pipe_file(path, b"x" * 1000)

    def error(fs, p=path) -> BaseException:
        with pytest.raises(Exception) as info:
            fs.cat_file(p)
        return info.value

    proxy = fault_proxy(azurite_server.endpoint, schedule=fail_first(1, "503"), methods=["GET"])
    busy = error(azurite_server.filesystem(proxy.endpoint, skip_instance_cache=True))
    assert type(busy).__name__ == "HttpResponseError" and busy.status_code == 503 and storage.is_transient(busy)
    refused = error(azurite_server.filesystem(f"http://127.0.0.1:{free_port()}", skip_instance_cache=True))
    assert type(refused).__name__ == "ServiceRequestError" and storage.is_transient(refused)
    missing = error(azurite_server.filesystem(), path + ".nope")
    assert isinstance(missing, FileNotFoundError) and not storage.is_transient(missing)
    wrong = azurite_connection_string(azurite_server.endpoint).replace(AZURITE_KEY, "d3Jvbmc=" * 11)
    denied = error(adlfs.AzureBlobFileSystem(connection_string=wrong, skip_instance_cache=True))
    assert getattr(denied, "status_code", None) == 403 and not storage.is_transient(denied)
