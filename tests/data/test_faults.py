"""Store faults (503 SlowDown, connection resets, truncated bodies, latency) through a real
proxy in front of moto / fake-gcs: everything is retried and accounting stays exact."""

from __future__ import annotations

import pytest

import errno

from data_helpers import check_sample, expected_sequence, make_samples, run_loaders
from trainkit import storage
from trainkit.data import Stream, write_shards
from trainkit.errors import StorageError
from trainkit.testing import fail_first

# botocore gives up at once: the retrying shown here is trainkit's
NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}}}


@pytest.fixture
def no_s3fs_retries(monkeypatch):
    """s3fs retries SlowDown itself (5 times, ~2 s); a class attribute, not an option."""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)


def test_s3_faults_exactly_once(s3_url, fault_proxy, storage_options, tmp_path, no_s3fs_retries):
    def faults(n, method, path):  # about one request in four fails, every kind occurs
        return "503" if n % 7 == 1 else "reset" if n % 11 == 3 else "reset_mid" if n % 13 == 5 else None

    proxy = fault_proxy(schedule=faults, latency=0.02)
    storage_options({"s3": {"endpoint_url": proxy.endpoint, **NO_CLIENT_RETRIES}})
    index = write_shards(make_samples(144), s3_url, shard_bytes=1200, workers=4)  # PUTs get faults too
    assert index["num_shards"] >= 10
    stream = Stream(s3_url, cache_dir=str(tmp_path), cache_bytes=8 * 2000, shuffle_window=2, prefetch=2)
    first, state = run_loaders(stream, world=2, workers=2, batch_size=24, steps=3, seed=6)
    rest, end = run_loaders(stream, world=3, workers=1, batch_size=24, steps=3, seed=6, state=state)
    assert end["position"] == 144
    assert first + rest == expected_sequence(stream, 6, 0, 144)
    assert sorted(first + rest) == list(range(144))
    assert proxy.counts["503"] > 0 and proxy.counts["reset"] > 0 and proxy.counts["reset_mid"] > 0, proxy.counts


def test_gcs_faults(gcs_server, gcs_url, fault_proxy, storage_options, tmp_path, no_s3fs_retries):
    storage_options({"gs": gcs_server.storage_options})
    write_shards(make_samples(48), gcs_url, shard_bytes=1500)
    proxy = fault_proxy(gcs_server.endpoint, p_503=0.15, p_reset=0.1, latency=0.01, methods=["GET"], seed=3)
    storage_options({"gs": {**gcs_server.options_for(proxy.endpoint)}})
    stream = Stream(gcs_url, cache_dir=str(tmp_path), shuffle_window=2)
    for i, s in enumerate(stream.get_many(range(48))):
        check_sample(s, i)
    assert proxy.injected > 0


def test_persistent_failure_names_the_shard(s3_url, fault_proxy, storage_options, tmp_path, no_s3fs_retries):
    write_shards(make_samples(20), s3_url, shard_bytes=1000)
    proxy = fault_proxy()
    storage_options({"s3": {"endpoint_url": proxy.endpoint, **NO_CLIENT_RETRIES}})
    stream = Stream(s3_url, cache_dir=str(tmp_path), prefetch=0)
    proxy.configure(schedule=fail_first(10**6, "503"), methods=["GET"])
    with pytest.raises(StorageError, match=rf"{s3_url}/shard-\d+\.tks"):
        stream[0]
    assert proxy.counts["503"] >= 8  # every attempt was made
    proxy.clear()
    check_sample(stream[0], 0)  # and nothing bad was cached


def test_shipped_retries_write_and_read_through_faults(s3_url, fault_proxy, storage_options, tmp_path):
    """As shipped: s3fs's and botocore's own retries, then trainkit's storage.retry around
    them. Writing and reading a dataset through 503s and resets on every kind of request
    loses nothing and raises nothing."""
    proxy = fault_proxy(p_503=0.15, p_reset=0.1, seed=11)
    storage_options({"s3": {"endpoint_url": proxy.endpoint}})
    write_shards(make_samples(60), s3_url, shard_bytes=1500, workers=3)
    stream = Stream(s3_url, cache_dir=str(tmp_path), shuffle_window=2, prefetch=2)
    for i, s in enumerate(stream.get_many(range(60))):
        check_sample(s, i)
    assert proxy.counts["503"] > 0 and proxy.counts["reset"] > 0, proxy.counts


def test_a_permanent_error_is_not_retried_and_names_the_url(s3_server, fault_proxy, storage_options):
    """A missing dataset is permanent: one StorageError naming the index's URL, after the
    few requests one attempt at the index and one listing (for Parquet files) take, not
    eight attempts' worth."""
    proxy = fault_proxy()
    storage_options({"s3": {"endpoint_url": proxy.endpoint}})
    url = f"{s3_server.bucket('trainkit-test')}/never-written"
    with pytest.raises(StorageError, match=rf"no dataset at {url}: .*{url}/index.json.*data.format="):
        Stream(url)
    assert 0 < proxy.counts["requests"] <= 6, proxy.counts
    before = proxy.counts["requests"]
    with pytest.raises(StorageError, match=rf"{url}/index.json"):
        Stream(url, format="trainkit")
    assert 0 < proxy.counts["requests"] - before <= 2, proxy.counts


def test_what_storage_retry_repeats():
    """The one classifier: store errors by errno, HTTP status or message; trainkit's own
    StorageError by its cause; Failures (one per rank) only when all are."""
    slowdown = OSError(errno.EBUSY, "Please reduce your request rate.")
    assert storage.is_transient(slowdown) and storage.is_transient(ConnectionResetError())
    assert not storage.is_transient(FileNotFoundError("s3://b/k")) and not storage.is_transient(ValueError("bad"))
    wrapped = StorageError("s3://b/k: OSError")
    wrapped.__cause__ = slowdown
    assert storage.is_transient(wrapped) and not storage.is_transient(StorageError("s3://b/k: connection"))
    assert storage.is_transient(storage.Failures("ranks", [slowdown, TimeoutError()]))
    assert not storage.is_transient(storage.Failures("ranks", [slowdown, PermissionError()]))
    assert not storage.is_transient(storage.Failures("ranks", []))

    class HttpResponseError(Exception):  # as azure-core raises it: the status in .status_code
        def __init__(self, message: str, status_code: int) -> None:
            super().__init__(message)
            self.status_code = status_code

    denied = HttpResponseError("Server failed to authenticate the request.\nRequestId:9f5003c1-e500-4a29\n"
                               "Time:2026-12-02T20:43:56.503Z\nErrorCode:AuthorizationFailure", 403)
    assert not storage.is_transient(denied)  # "500"/"503" in its request id and time say nothing
    assert storage.is_transient(HttpResponseError("Server busy", 503))

    failures, heard, pauses = [TimeoutError("t"), slowdown], [], []

    def flaky():
        if failures:
            raise failures.pop(0)
        return "ok"

    assert storage.retry(flaky, what="s3://b/k", sleep=pauses.append,
                         on_retry=lambda n, exc: heard.append((n, type(exc)))) == "ok"
    assert heard == [(1, TimeoutError), (2, OSError)] and len(pauses) == 2
    with pytest.raises(StorageError, match=r"^s3://b/k: PermissionError: no") as info:
        storage.retry(lambda: (_ for _ in ()).throw(PermissionError("no")), what="s3://b/k", sleep=pauses.append)
    assert isinstance(info.value.__cause__, PermissionError) and len(pauses) == 2


def test_downloads_are_sized_from_latency_and_shard_size(s3_url, fault_proxy, storage_options, tmp_path):
    """Small shards behind 50 ms to first byte: as many downloads as the cap allows (each
    connection mostly waits); an explicit prefetch wins; file:// needs none."""
    write_shards(make_samples(40), s3_url, shard_bytes=1000)
    proxy = fault_proxy(latency=0.05)
    storage_options({"s3": {"endpoint_url": proxy.endpoint}})
    from trainkit.data.stream import MAX_DOWNLOADS

    assert Stream(s3_url, cache_dir=str(tmp_path)).prefetch == MAX_DOWNLOADS
    assert Stream(s3_url, cache_dir=str(tmp_path), prefetch=3).prefetch == 3
    local = "file://" + str(tmp_path / "local")
    write_shards(make_samples(10), local)
    assert Stream(local).prefetch == 0
