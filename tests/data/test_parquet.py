"""Parquet datasets (row groups as shards) keep the order, resume and cache contract.

The layout is what Hugging Face ``datasets``' ``to_parquet`` writes (one file, row groups, the
``huggingface`` schema metadata) and what Ray Data / DuckDB write (a folder of files). The
``datasets`` package is not installed here, so the files are written by pyarrow in that layout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_helpers import expected_sequence, run_loaders
from test_cache import DirMonitor
from trainkit import storage
from trainkit.data import Stream, default_collate
from trainkit.errors import ConfigError, StorageError

N = 240


def _table(lo: int, hi: int):
    import pyarrow as pa

    ids = list(range(lo, hi))
    images = [((np.arange(4 * 4 * 3) + i) % 256).astype(np.uint8).reshape(4, 4, 3).tolist() for i in ids]
    meta = {"info": {"features": {"id": {"dtype": "int64", "_type": "Value"}}}}
    return pa.table({"id": pa.array(ids, pa.int64()),
                     "image": pa.array(images, pa.list_(pa.list_(pa.list_(pa.uint8())))),
                     "label": pa.array([i % 10 for i in ids], pa.int64()),
                     "score": pa.array([i / 4 for i in ids], pa.float32()),
                     "text": [f"row {i}" for i in ids],
                     "tokens": pa.array([list(range(i % 4 + 1)) for i in ids], pa.list_(pa.int32()))},
                    ).replace_schema_metadata({"huggingface": json.dumps(meta)})


def write_parquet(url: str, files: int = 1, row_group: int = 20) -> None:
    """``files == 1``: ``to_parquet``'s single file; more: a folder with a subfolder (files are
    read in path order, so row ``id`` is the sample id)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    cuts = np.linspace(0, N, files + 1).astype(int)
    for k in range(files):
        name = "train.parquet" if files == 1 else f"{'sub/' if k == files - 1 else ''}part-{k:03d}.parquet"
        target = f"{path}/{name}"
        if storage.is_local(url):
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(target, "wb") as f:
            pq.write_table(_table(cuts[k], cuts[k + 1]), f, row_group_size=row_group)


def check_row(s: dict, i: int) -> None:
    assert s["id"] == i and s["label"] == i % 10 and s["text"] == f"row {i}"
    assert s["score"] == pytest.approx(i / 4)
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (4, 4, 3)
    assert s["image"].flatten().tolist() == ((np.arange(48) + i) % 256).tolist()
    assert s["tokens"].tolist() == list(range(i % 4 + 1))


def _no_tokens(s):
    return {k: v for k, v in s.items() if k != "tokens"}


@pytest.fixture(params=["file", "s3"])
def url(request, tmp_path):
    if request.param == "file":
        return "file://" + str(tmp_path / "pq")
    return request.getfixturevalue("s3_url") + "/pq"


def test_reads_a_to_parquet_file_like_trainkit_shards(url, tmp_path):
    write_parquet(url)
    stream = Stream(url, cache_dir=str(tmp_path / "cache"))
    assert stream.format == "parquet" and len(stream) == N and stream.num_shards == N // 20
    assert stream.schema["image"] == {"kind": "ndarray", "dtype": "uint8"} and stream.schema["text"] == {"kind": "str"}
    for i in (0, 19, 20, 123, N - 1):
        check_row(stream[i], i)
    ids = [3, 203, 7, 43, 47, 199]  # across row groups, any order; "tokens" of one length (i % 4 == 3)
    want = default_collate(stream.get_many(ids))
    got = stream.read_batch(ids)
    assert got.keys() == want.keys()
    for k in want:
        assert (torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype) if isinstance(want[k], torch.Tensor) \
            else got[k] == want[k], k
    with pytest.raises(ConfigError, match="'tokens'.*different shapes"):  # as default_collate would
        stream.read_batch([1, 2])
    assert Stream(url, cache_dir=str(tmp_path / "cache"), format="parquet").num_shards == stream.num_shards
    with pytest.raises(StorageError, match="no trainkit dataset"):
        Stream(url, format="trainkit")


def test_exactly_once_and_elastic_resume(url, tmp_path):
    write_parquet(url, files=3, row_group=16)
    stream = Stream(url, cache_dir=str(tmp_path / "cache"), shuffle_window=3)
    assert stream.num_shards == 15  # 80 rows per file: 5 row groups of 16
    seq, state = run_loaders(stream, world=2, workers=2, batch_size=24, grad_accum=2, steps=10, seed=5,
                             transform=_no_tokens)
    assert seq == expected_sequence(stream, 5, 0, N) and sorted(seq) == list(range(N))
    first, state = run_loaders(stream, world=2, workers=2, batch_size=12, steps=7, seed=11, transform=_no_tokens)
    for world, workers in ((3, 1), (1, 3)):
        rest, end = run_loaders(stream, world=world, workers=workers, batch_size=12, steps=13, seed=0, state=state,
                                transform=_no_tokens)
        assert end["position"] == N and sorted(first + rest) == list(range(N))
        assert first + rest == expected_sequence(stream, 11, 0, N)


def test_cache_stays_bounded_by_files(memory_url, tmp_path):
    write_parquet(memory_url, files=6, row_group=10)
    fs, path = storage.filesystem(memory_url)
    sizes = [fs.size(p) for p in fs.find(path)]
    bound = 2 * max(sizes) + max(sizes) // 2  # fewer files than the dataset holds (6)
    stream = Stream(memory_url, cache_dir=str(tmp_path), cache_bytes=bound, shuffle_window=2, prefetch=2)
    with DirMonitor(stream.cache_dir) as mon:
        seq, _ = run_loaders(stream, world=1, workers=2, batch_size=20, steps=24, seed=3, transform=_no_tokens)
    assert sorted(seq) == sorted(list(range(N)) * 2)
    assert 0 < mon.max <= bound, (mon.max, bound)


def test_corrupt_file_names_its_url(url, tmp_path):
    write_parquet(url, files=2, row_group=20)
    stream = Stream(url, cache_dir=str(tmp_path / "cache"))
    bad = stream.shards[-1].url
    fs, path = storage.filesystem(bad)
    data = bytearray(fs.cat_file(path))
    data[8:-200] = bytes(len(data) - 208)  # pages zeroed, same size, footer intact
    fs.pipe_file(path, bytes(data))
    check_row(stream[0], 0)  # the other file still reads
    with pytest.raises(StorageError, match=rf"{bad}: corrupt Parquet file"):
        stream[N - 1]


def test_through_the_fault_proxy(s3_url, fault_proxy, storage_options, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    url = s3_url + "/pq"
    write_parquet(url, files=3, row_group=16)
    proxy = fault_proxy(schedule=lambda n, m, p: "503" if n % 5 == 1 else "reset" if n % 7 == 3 else None,
                        latency=0.02, methods=["GET", "HEAD"])
    storage_options({"s3": {"endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}})
    stream = Stream(url, cache_dir=str(tmp_path), shuffle_window=2)
    first, state = run_loaders(stream, world=2, workers=1, batch_size=24, steps=4, seed=6, transform=_no_tokens)
    rest, end = run_loaders(stream, world=1, workers=0, batch_size=24, steps=6, seed=6, state=state,
                            transform=_no_tokens)
    assert first + rest == expected_sequence(stream, 6, 0, N)
    assert proxy.counts["503"] > 0 and proxy.counts["reset"] > 0, proxy.counts


def test_each_row_group_is_decoded_once_per_epoch(tmp_path):
    """Decoding a row group is the costly part of reading Parquet: batches that straddle
    windows keep all their shards mapped instead of decoding some twice."""
    url = "file://" + str(tmp_path / "pq")
    write_parquet(url, files=4, row_group=12)
    stream = Stream(url, shuffle_window=2)
    opened = []
    source_open = stream.source.open
    stream.source.open = lambda i, buf: (opened.append(i), source_open(i, buf))[1]
    seq, _ = run_loaders(stream, world=1, workers=0, batch_size=40, steps=6, transform=_no_tokens)
    assert sorted(seq) == list(range(N))
    assert sorted(opened) == list(range(stream.num_shards))
