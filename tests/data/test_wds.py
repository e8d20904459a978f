"""WebDataset tars with an index of member offsets keep the order, resume and cache contract."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest

from data_helpers import expected_sequence, run_loaders
from test_cache import DirMonitor
from trainkit import storage
from trainkit.data import Stream, default_collate
from trainkit.data.wds import build_index
from trainkit.errors import StorageError

N = 240


def write_tars(url: str, per_tar: int = 25) -> None:
    """WebDataset layout: ``<key>.img`` and ``<key>.cls`` members, consecutive per sample."""
    fs, path = storage.filesystem(url)
    for k in range(0, N, per_tar):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(k, min(N, k + per_tar)):
                for ext, data in (("img", bytes([i % 256]) * (100 + i)), ("cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(f"part/{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        target = f"{path}/shard-{k // per_tar:04d}.tar"
        if storage.is_local(url):
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(target, buf.getvalue())


def check(s: dict, i: int) -> None:
    assert s["__key__"] == f"part/{i:06d}" and s["img"] == bytes([i % 256]) * (100 + i) and s["cls"] == str(i % 10).encode()


def _ids(s: dict) -> dict:
    return {"id": int(s["__key__"].rsplit("/", 1)[1]), "img": s["img"]}


@pytest.fixture(params=["file", "s3"])
def url(request, tmp_path):
    if request.param == "file":
        return "file://" + str(tmp_path / "wds")
    return request.getfixturevalue("s3_url") + "/wds"


def test_index_is_required_then_random_access(url, tmp_path):
    write_tars(url)
    with pytest.raises(StorageError, match=r"no wds-index.json; build it once with `python -m trainkit.data index"):
        Stream(url)
    r = subprocess.run([sys.executable, "-m", "trainkit.data", "index", url], capture_output=True, text=True,
                       timeout=120)  # the s3 server fixture exports its endpoint to child processes
    assert r.returncode == 0, r.stderr
    assert f"indexed {N} samples in 10 tars (fields cls, img)" in r.stdout
    stream = Stream(url, cache_dir=str(tmp_path / "cache"))
    assert stream.format == "webdataset" and len(stream) == N and stream.num_shards == 10
    for i in (0, 24, 25, 137, N - 1):
        check(stream[i], i)
    ids = [150, 3, 77, 26, 199]
    assert stream.read_batch(ids) == default_collate(stream.get_many(ids))
    assert stream.read_batch(ids)["__key__"] == [f"part/{i:06d}" for i in ids]


def test_exactly_once_and_elastic_resume(url, tmp_path):
    write_tars(url, per_tar=20)
    build_index(url)
    stream = Stream(url, cache_dir=str(tmp_path / "cache"), shuffle_window=3)
    seq, _ = run_loaders(stream, world=2, workers=2, batch_size=20, grad_accum=2, steps=12, seed=5, transform=_ids)
    assert seq == expected_sequence(stream, 5, 0, N) and sorted(seq) == list(range(N))
    first, state = run_loaders(stream, world=2, workers=2, batch_size=12, steps=7, seed=11, transform=_ids)
    for world, workers in ((3, 1), (1, 3)):
        rest, end = run_loaders(stream, world=world, workers=workers, batch_size=12, steps=13, seed=0, state=state,
                                transform=_ids)
        assert end["position"] == N and first + rest == expected_sequence(stream, 11, 0, N)


def test_cache_bound(memory_url, tmp_path):
    write_tars(memory_url, per_tar=10)
    index = build_index(memory_url)
    largest = max(s["bytes"] for s in index["shards"])
    bound = 5 * largest
    assert sum(s["bytes"] for s in index["shards"]) > 3 * bound
    stream = Stream(memory_url, cache_dir=str(tmp_path), cache_bytes=bound, shuffle_window=2, prefetch=2)
    with DirMonitor(stream.cache_dir) as mon:
        seq, _ = run_loaders(stream, world=1, workers=2, batch_size=20, steps=24, seed=3, transform=_ids)
    assert sorted(seq) == sorted(list(range(N)) * 2)
    assert 0 < mon.max <= bound, (mon.max, bound)


def test_corrupt_tar_names_its_url(url, tmp_path):
    write_tars(url)
    build_index(url)
    bad = f"{url}/shard-0003.tar"
    fs, path = storage.filesystem(bad)
    data = bytearray(fs.cat_file(path))
    data[1000] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    stream = Stream(url, cache_dir=str(tmp_path / "cache"))
    check(stream[0], 0)
    with pytest.raises(StorageError, match=rf"{bad}: corrupt shard: crc32c"):
        stream[80]


def test_through_the_fault_proxy(s3_url, fault_proxy, storage_options, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    url = s3_url + "/wds"
    write_tars(url, per_tar=20)
    build_index(url)
    proxy = fault_proxy(schedule=lambda n, m, p: "503" if n % 5 == 1 else "reset_mid" if n % 7 == 3 else None,
                        latency=0.02, methods=["GET"])
    storage_options({"s3": {"endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}})
    stream = Stream(url, cache_dir=str(tmp_path), shuffle_window=2)
    first, state = run_loaders(stream, world=2, workers=1, batch_size=20, steps=4, seed=6, transform=_ids)
    rest, _ = run_loaders(stream, world=1, workers=0, batch_size=20, steps=8, seed=6, state=state, transform=_ids)
    assert first + rest == expected_sequence(stream, 6, 0, N)
    assert proxy.counts["503"] > 0 and proxy.counts["reset_mid"] > 0, proxy.counts
