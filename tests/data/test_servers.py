"""Smoke tests: the loopback S3/GCS servers and the fault proxy work with s3fs/gcsfs."""

from __future__ import annotations

import fsspec

from trainkit.testing import fail_first


def test_s3_roundtrip(s3_server, s3_url):
    fs = fsspec.filesystem("s3", **s3_server.storage_options, skip_instance_cache=True)
    path = s3_url[len("s3://"):] + "/hello.bin"
    fs.pipe(path, b"hello" * 1000)
    assert fs.cat(path) == b"hello" * 1000
    # FSSPEC_S3_ENDPOINT_URL / fsspec config: a plain url works with no options
    with fsspec.open(s3_url + "/hello.bin", "rb") as f:
        assert f.read(5) == b"hello"


def test_gcs_roundtrip(gcs_server, gcs_url):
    fs = fsspec.filesystem("gs", **gcs_server.storage_options, skip_instance_cache=True)
    path = gcs_url[len("gs://"):] + "/hello.bin"
    fs.pipe(path, b"world" * 1000)
    assert fs.cat(path) == b"world" * 1000
    assert fs.size(path) == 5000
    assert fs.cat_file(path, start=5, end=10) == b"world"


def test_fault_proxy_injects_and_client_retries(s3_server, s3_url, fault_proxy):
    direct = fsspec.filesystem("s3", **s3_server.storage_options, skip_instance_cache=True)
    path = s3_url[len("s3://"):] + "/x.bin"
    direct.pipe(path, b"x" * 100_000)

    proxy = fault_proxy(latency=0.02, schedule=fail_first(2, "503"), methods=["GET"])
    fs = fsspec.filesystem("s3", endpoint_url=proxy.endpoint, skip_instance_cache=True)
    assert fs.cat(path) == b"x" * 100_000  # botocore retries the SlowDowns itself
    assert proxy.counts["503"] == 2 and proxy.counts["forwarded"] >= 1

    proxy.configure(schedule=fail_first(1, "reset"))
    assert fs.cat(path) == b"x" * 100_000
    assert proxy.counts["reset"] >= 1


def test_fault_proxy_reset_mid(s3_server, s3_url, fault_proxy):
    direct = fsspec.filesystem("s3", **s3_server.storage_options, skip_instance_cache=True)
    path = s3_url[len("s3://"):] + "/y.bin"
    direct.pipe(path, b"y" * 300_000)
    proxy = fault_proxy(schedule=lambda n, m, p: "reset_mid" if n == 0 else None, methods=["GET"])
    fs = fsspec.filesystem("s3", endpoint_url=proxy.endpoint, skip_instance_cache=True)
    try:
        data = fs.cat(path)
    except Exception as exc:  # noqa: BLE001 - a truncated body may surface; it must not be silent
        from trainkit.storage import is_transient

        assert is_transient(exc), exc
    else:
        assert data == b"y" * 300_000
    assert proxy.counts["reset_mid"] == 1


def test_fault_proxy_in_front_of_gcs(gcs_server, gcs_url, fault_proxy):
    direct = fsspec.filesystem("gs", **gcs_server.storage_options, skip_instance_cache=True)
    path = gcs_url[len("gs://"):] + "/z.bin"
    direct.pipe(path, b"z" * 1000)
    proxy = fault_proxy(gcs_server.endpoint, latency=0.01)
    fs = fsspec.filesystem("gs", **gcs_server.options_for(proxy.endpoint), skip_instance_cache=True)
    assert fs.cat(path) == b"z" * 1000
    assert proxy.counts["forwarded"] >= 1
