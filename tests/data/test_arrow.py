"""Hugging Face ``datasets``' own ``save_to_disk`` (Arrow IPC streams, state.json) and
``to_parquet`` output, read directly with the order, resume and cache contract.

The files are written by the real ``datasets`` package (the ``test`` extra). ``save_to_disk``
writes record batches of 1,000 rows, so 2 files of 1,200 rows hold 4 shards of 1,000 and 200.
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

datasets = pytest.importorskip("datasets")

N = 2400


def _image(i: int) -> np.ndarray:
    return ((np.arange(48) + i) % 256).astype(np.uint8).reshape(4, 4, 3)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A local ``save_to_disk`` folder, a DatasetDict's, and a ``to_parquet`` file."""
    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("hf")
    feats = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Array3D((4, 4, 3), "uint8"),
                               "label": datasets.ClassLabel(num_classes=10), "score": datasets.Value("float32"),
                               "text": datasets.Value("string"),
                               "tokens": datasets.Sequence(datasets.Value("int32"))})
    ids = list(range(N))
    ds = datasets.Dataset.from_dict({"id": ids, "image": [_image(i) for i in ids], "label": [i % 10 for i in ids],
                                     "score": [i / 4 for i in ids], "text": [f"row {i}" for i in ids],
                                     "tokens": [list(range(i % 4 + 1)) for i in ids]}, features=feats)
    ds.save_to_disk(str(root / "disk"), num_shards=2)
    ds.remove_columns("tokens").save_to_disk(str(root / "fixed"), num_shards=2)  # batches read whole
    datasets.DatasetDict({"train": ds, "test": ds.select(range(10))}).save_to_disk(str(root / "dict"))
    ds.to_parquet(str(root / "train.parquet"), batch_size=300)
    return root


def _upload(local, url: str) -> str:
    fs, path = storage.filesystem(url)
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"{path}/{f.relative_to(local).as_posix()}", f.read_bytes())
    return url


@pytest.fixture(params=["file", "s3"])
def disk_url(request, hf):
    if request.param == "file":
        return "file://" + str(hf / "disk")
    return _upload(hf / "disk", request.getfixturevalue("s3_url") + "/disk")


@pytest.fixture(params=["file", "s3"])
def fixed_url(request, hf):
    if request.param == "file":
        return "file://" + str(hf / "fixed")
    return _upload(hf / "fixed", request.getfixturevalue("s3_url") + "/fixed")


def check_row(s: dict, i: int) -> None:
    assert s["id"] == i and s["label"] == i % 10 and s["text"] == f"row {i}"
    assert s["score"] == pytest.approx(i / 4)
    assert s["image"].dtype == torch.uint8 and torch.equal(s["image"], torch.from_numpy(_image(i)))
    assert s["tokens"].tolist() == list(range(i % 4 + 1))


def _same_batch(stream: Stream, ids: list[int]) -> None:
    want = default_collate(stream.get_many(ids))
    got = stream.read_batch(ids)
    assert got.keys() == want.keys()
    for k in want:
        assert (torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype) if isinstance(want[k], torch.Tensor) \
            else got[k] == want[k], k


def test_reads_save_to_disk_in_place(disk_url, tmp_path):
    stream = Stream(disk_url, cache_dir=str(tmp_path / "cache"))
    assert stream.format == "arrow" and len(stream) == N
    assert [s.num_samples for s in stream.shards] == [1000, 200, 1000, 200]  # record batches as shards
    assert stream.schema["image"] == {"kind": "ndarray", "dtype": "uint8"} and stream.schema["label"] == {"kind": "int"}
    for i in (0, 999, 1000, 1199, 1200, N - 1):
        check_row(stream[i], i)
    _same_batch(stream, [3, 2203, 7, 1043, 1199, 1999])  # across batches and files; "tokens" of one length
    ids = list(range(103, 359, 4))  # one shard, in order
    got = stream.read_batch(ids)
    assert got["image"].shape == (64, 4, 4, 3) and got["id"].tolist() == ids and got["tokens"].shape == (64, 4)
    with pytest.raises(ConfigError, match="'tokens'.*different shapes"):  # as default_collate would
        stream.read_batch([1, 2])
    if not storage.is_local(disk_url):
        assert stream.cache.stats["fetches"] == 2  # whole files, each once


def test_to_parquet_output(hf, tmp_path):
    stream = Stream("file://" + str(hf / "train.parquet"))
    assert stream.format == "parquet" and len(stream) == N and stream.num_shards == N // 300
    for i in (0, 299, 300, N - 1):
        check_row(stream[i], i)
    _same_batch(stream, [3, 2203, 7, 1043, 1199, 1999])


def test_dataset_dict_root_names_its_splits(hf):
    with pytest.raises(ConfigError, match=r"DatasetDict: read one split, e\.g\. .*/dict/train"):
        Stream("file://" + str(hf / "dict"))
    assert len(Stream("file://" + str(hf / "dict" / "test"))) == 10


def test_exactly_once_and_elastic_resume(fixed_url, tmp_path):
    stream = Stream(fixed_url, cache_dir=str(tmp_path / "cache"), shuffle_window=2)
    seq, _ = run_loaders(stream, world=2, workers=2, batch_size=480, steps=5, seed=5)
    assert seq == expected_sequence(stream, 5, 0, N) and sorted(seq) == list(range(N))
    first, state = run_loaders(stream, world=2, workers=2, batch_size=240, steps=3, seed=11)
    for world, workers in ((3, 1), (1, 3)):
        rest, end = run_loaders(stream, world=world, workers=workers, batch_size=240, steps=7, seed=0, state=state)
        assert end["position"] == N and sorted(first + rest) == list(range(N))
        assert first + rest == expected_sequence(stream, 11, 0, N)


def test_cache_stays_bounded_by_files(hf, memory_url, tmp_path):
    datasets.Dataset.from_dict({"id": list(range(N)), "x": [[float(i)] * 16 for i in range(N)]}).save_to_disk(
        str(tmp_path / "six"), num_shards=6)
    url = _upload(tmp_path / "six", memory_url)
    biggest = max(p.stat().st_size for p in (tmp_path / "six").glob("*.arrow"))
    bound = 2 * biggest + biggest // 2  # fewer files than the dataset holds (6)
    stream = Stream(url, cache_dir=str(tmp_path / "cache"), cache_bytes=bound, shuffle_window=2, prefetch=2)
    with DirMonitor(stream.cache_dir) as mon:
        seq, _ = run_loaders(stream, world=1, workers=2, batch_size=200, steps=24, seed=3)
    assert sorted(seq) == sorted(list(range(N)) * 2)
    assert 0 < mon.max <= bound, (mon.max, bound)


def test_corrupt_file_names_its_url(hf, s3_url, tmp_path):
    url = _upload(hf / "disk", s3_url + "/disk")
    stream = Stream(url, cache_dir=str(tmp_path / "cache"))
    bad = stream.shards[-1].url
    fs, path = storage.filesystem(bad)
    data = bytearray(fs.cat_file(path))
    off, length = stream.source._where[-1]
    data[off + 8: off + 40] = b"\xff" * 32  # the last record batch's message header, same size
    fs.pipe_file(path, bytes(data))
    check_row(stream[0], 0)  # the other file still reads
    with pytest.raises(StorageError, match=rf"{bad}: corrupt Arrow file"):
        stream[N - 1]
    url = _upload(hf / "disk", s3_url + "/disk2")  # now a body: offsets that point past the values
    first = Stream(url, cache_dir=str(tmp_path / "cache2")).shards[0].url
    fs, path = storage.filesystem(first)
    data = bytearray(fs.cat_file(path))
    off, length = stream.source._where[0]
    data[off + length - 64 * 1024: off + length] = b"\x7f" * (64 * 1024)
    fs.pipe_file(path, bytes(data))
    stream = Stream(url, cache_dir=str(tmp_path / "cache3"))
    with pytest.raises(StorageError, match=rf"{first}: corrupt Arrow file"):
        stream[0]


def test_through_the_fault_proxy(hf, s3_url, fault_proxy, storage_options, tmp_path, monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    url = _upload(hf / "fixed", s3_url + "/fixed")
    proxy = fault_proxy(schedule=lambda n, m, p: "503" if n % 5 == 1 else "reset" if n % 7 == 3 else None,
                        latency=0.02, methods=["GET", "HEAD"])
    storage_options({"s3": {"endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}})
    stream = Stream(url, cache_dir=str(tmp_path), shuffle_window=2)
    first, state = run_loaders(stream, world=2, workers=1, batch_size=600, steps=2, seed=6)
    rest, end = run_loaders(stream, world=1, workers=0, batch_size=600, steps=2, seed=6, state=state)
    assert first + rest == expected_sequence(stream, 6, 0, N)
    assert proxy.counts["503"] > 0 and proxy.counts["reset"] > 0, proxy.counts


def test_state_json_orders_the_files(hf, tmp_path):
    """``state.json`` lists the files in the dataset's order; a file it names must be there."""
    import shutil

    shutil.copytree(hf / "disk", tmp_path / "disk")
    state = json.loads((tmp_path / "disk" / "state.json").read_text())
    names = [d["filename"] for d in state["_data_files"]]
    (tmp_path / "disk" / names[0]).rename(tmp_path / "disk" / "zz.arrow")
    state["_data_files"][0]["filename"] = "zz.arrow"  # first in the dataset, last by path
    (tmp_path / "disk" / "state.json").write_text(json.dumps(state))
    stream = Stream("file://" + str(tmp_path / "disk"))
    check_row(stream[0], 0)
    state["_data_files"].append({"filename": "gone.arrow"})
    (tmp_path / "disk" / "state.json").write_text(json.dumps(state))
    with pytest.raises(StorageError, match="names gone.arrow, which is not there"):
        Stream("file://" + str(tmp_path / "disk"))
