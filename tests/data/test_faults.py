"""Store faults (503 SlowDown, connection resets, truncated bodies, latency) through a real
proxy in front of moto / fake-gcs: everything is retried and accounting stays exact."""

from __future__ import annotations

import pytest

from data_helpers import check_sample, expected_sequence, make_samples, run_loaders
from trainkit.data import Stream, write_shards
from trainkit.errors import StorageError
from trainkit.testing import fail_first

# botocore gives up at once: the retrying shown here is trainkit's
NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}}}


@pytest.fixture(autouse=True)
def _no_s3fs_retries(monkeypatch):
    """s3fs retries SlowDown itself (5 times, ~2 s); a class attribute, not an option."""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)


def test_s3_faults_exactly_once(s3_url, fault_proxy, storage_options, tmp_path):
    def faults(n, method, path):  # about one request in four fails, every kind occurs
        return "503" if n % 7 == 1 else "reset" if n % 11 == 3 else "reset_mid" if n % 13 == 5 else None

    proxy = fault_proxy(schedule=faults, latency=0.02)
    storage_options({"s3": {"endpoint_url": proxy.endpoint, **NO_CLIENT_RETRIES}})
    index = write_shards(make_samples(144), s3_url, shard_bytes=1500, workers=4)  # PUTs get faults too
    assert index["num_shards"] >= 10
    stream = Stream(s3_url, cache_dir=str(tmp_path), cache_bytes=8 * 2000, shuffle_window=2, prefetch=2)
    first, state = run_loaders(stream, world=2, workers=2, batch_size=24, steps=3, seed=6)
    rest, end = run_loaders(stream, world=3, workers=1, batch_size=24, steps=3, seed=6, state=state)
    assert end["position"] == 144
    assert first + rest == expected_sequence(stream, 6, 0, 144)
    assert sorted(first + rest) == list(range(144))
    assert proxy.counts["503"] > 0 and proxy.counts["reset"] > 0 and proxy.counts["reset_mid"] > 0, proxy.counts


def test_gcs_faults(gcs_server, gcs_url, fault_proxy, storage_options, tmp_path):
    storage_options({"gs": gcs_server.storage_options})
    write_shards(make_samples(48), gcs_url, shard_bytes=1500)
    proxy = fault_proxy(gcs_server.endpoint, p_503=0.15, p_reset=0.1, latency=0.01, methods=["GET"], seed=3)
    storage_options({"gs": {**gcs_server.options_for(proxy.endpoint)}})
    stream = Stream(gcs_url, cache_dir=str(tmp_path), shuffle_window=2)
    for i, s in enumerate(stream.get_many(range(48))):
        check_sample(s, i)
    assert proxy.injected > 0


def test_persistent_failure_names_the_shard(s3_url, fault_proxy, storage_options, tmp_path):
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
