"""Write + read roundtrips on file://, memory://, s3:// (moto) and gs:// (fake-gcs); errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_helpers import check_sample, make_samples, run_loaders
from trainkit import storage
from trainkit.data import Stream, read_index, write_shards
from trainkit.errors import ConfigError, StorageError


def _roundtrip(url: str, cache_dir, n: int = 60) -> Stream:
    index = write_shards(make_samples(n, payload=50), url, shard_bytes=1500, workers=4)
    assert index["num_samples"] == n and index["num_shards"] > 3
    assert set(index["schema"]) == {"id", "x", "y", "raw", "name"}
    assert index["schema"]["x"] == {"kind": "tensor", "dtype": "float32"}
    assert all(len(s["sha256"]) == 64 and len(s["crc32c"]) == 8 for s in index["shards"])
    assert index["checksum"] == "crc32c, sha256"
    assert read_index(url) == index
    stream = Stream(url, cache_dir=str(cache_dir), shuffle_window=2)
    assert len(stream) == n
    for i in (0, 1, n // 2, n - 1):
        check_sample(stream[i], i, payload=50)
    for i, s in zip(range(n), stream.get_many(range(n))):
        check_sample(s, i, payload=50)
    seq, _ = run_loaders(stream, world=2, workers=0, batch_size=6, steps=n // 6)
    assert sorted(seq) == list(range(n))
    return stream


def test_roundtrip_file(tmp_path):
    stream = _roundtrip("file://" + str(tmp_path / "ds"), tmp_path / "cache")
    assert stream.cache_dir is None  # read in place
    # a plain path works as well
    assert len(Stream(str(tmp_path / "ds"))) == 60


def test_roundtrip_memory(memory_url, tmp_path):
    stream = _roundtrip(memory_url, tmp_path / "cache")
    assert stream.cache.stats["fetches"] == stream.num_shards


def test_roundtrip_s3(s3_url, tmp_path):
    stream = _roundtrip(s3_url, tmp_path / "cache")
    assert stream.cache.stats["fetches"] == stream.num_shards


def test_roundtrip_gcs(gcs_server, gcs_url, tmp_path, storage_options):
    storage_options({"gs": gcs_server.storage_options})
    stream = _roundtrip(gcs_url, tmp_path / "cache")
    assert stream.cache.stats["fetches"] == stream.num_shards


def test_s3_with_loader_workers(s3_url, tmp_path):
    """Real DataLoader workers sharing one cache directory; the main process fetches for them
    (a worker that downloads pays for a store client of its own)."""
    write_shards(make_samples(96), s3_url, shard_bytes=2000)
    stream = Stream(s3_url, cache_dir=str(tmp_path), shuffle_window=2)
    seq, state = run_loaders(stream, world=2, workers=2, batch_size=16, steps=6, seed=4)
    assert sorted(seq) == list(range(96)) and state["position"] == 96
    cached = {e.name for e in stream.cache_dir.iterdir() if not e.name.startswith(".")}
    assert cached == {stream.shards[i].local_name for i in stream.cache.fetched}
    assert len(cached) == stream.num_shards


def test_dtypes_roundtrip(memory_url, tmp_path):
    sample = {
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "f16": torch.ones(3, dtype=torch.float16),
        "i64": torch.tensor(7),
        "bool": np.array([True, False]),
        "u8": np.arange(5, dtype=np.uint8),
        "f64np": np.linspace(0, 1, 4),
        "big_endian": np.arange(3, dtype=">i4"),
        "flag": True,
        "neg": -5,
        "pi": 3.25,
        "blob": b"\x00\xff",
        "text": "héllo",
        "noncontig": torch.arange(12).reshape(3, 4).t(),
    }
    write_shards([sample, sample], memory_url)
    got = Stream(memory_url, cache_dir=str(tmp_path))[1]
    assert got["bf16"].dtype == torch.bfloat16 and torch.equal(got["bf16"], sample["bf16"])
    assert got["f16"].dtype == torch.float16
    assert got["i64"].shape == () and int(got["i64"]) == 7
    assert got["bool"].tolist() == [True, False]
    assert got["u8"].tolist() == list(range(5))
    assert torch.allclose(got["f64np"], torch.linspace(0, 1, 4, dtype=torch.float64))
    assert got["big_endian"].tolist() == [0, 1, 2]
    assert got["flag"] is True and got["neg"] == -5 and got["pi"] == 3.25
    assert got["blob"] == b"\x00\xff" and got["text"] == "héllo"
    assert torch.equal(got["noncontig"], sample["noncontig"])


def test_bad_samples_are_refused(memory_url):
    with pytest.raises(ConfigError, match="cannot store"):
        write_shards([{"a": object()}], memory_url)
    with pytest.raises(ConfigError, match="differ"):
        write_shards([{"a": 1}, {"a": 1, "b": 2}], memory_url)
    with pytest.raises(ConfigError, match="differs from the schema"):
        write_shards([{"a": torch.zeros(2)}, {"a": torch.zeros(2, dtype=torch.int64)}], memory_url)
    fs, path = storage.filesystem(memory_url)
    assert not fs.exists(path + "/index.json"), "a failed write must not leave an index"


def _corrupt(url: str, name: str) -> None:
    fs, path = storage.filesystem(storage.join(url, name))
    data = bytearray(fs.cat_file(path))
    data[-3] ^= 0xFF  # same size, different bytes
    fs.pipe_file(path, bytes(data))


def _as_written_before_crc32c(url: str, index: dict) -> None:
    """The index as trainkit wrote it before shards carried a CRC32C: sha256 only."""
    old = {**index, "checksum": "sha256", "shards": [{k: v for k, v in s.items() if k != "crc32c"}
                                                     for s in index["shards"]]}
    fs, path = storage.filesystem(storage.join(url, "index.json"))
    fs.pipe_file(path, json.dumps(old).encode())


@pytest.mark.parametrize("checksum", ["crc32c", "sha256"])
@pytest.mark.parametrize("where", ["file", "memory", "s3"])
def test_corrupt_shard_names_its_url(where, checksum, tmp_path, memory_url, request):
    url = {"file": lambda: "file://" + str(tmp_path / "ds"), "memory": lambda: memory_url,
           "s3": lambda: request.getfixturevalue("s3_url")}[where]()
    index = write_shards(make_samples(40), url, shard_bytes=1000)
    if checksum == "sha256":
        _as_written_before_crc32c(url, index)
    bad = index["shards"][1]["name"]
    _corrupt(url, bad)
    stream = Stream(url, cache_dir=str(tmp_path / "cache"))
    first_of_bad = index["shards"][0]["samples"]
    stream[0]  # a good shard still reads
    with pytest.raises(StorageError, match=rf"{url}/{bad}: corrupt shard: {checksum} [0-9a-f]+, index says"):
        stream[first_of_bad]
    if stream.cache_dir is not None:  # nothing half-verified is left in the cache
        assert not [p for p in stream.cache_dir.iterdir() if p.name.startswith(bad)]


def test_missing_shard_names_its_url(s3_url, tmp_path):
    index = write_shards(make_samples(30), s3_url, shard_bytes=1000)
    gone = index["shards"][-1]["name"]
    fs, path = storage.filesystem(storage.join(s3_url, gone))
    fs.rm(path)
    stream = Stream(s3_url, cache_dir=str(tmp_path))
    with pytest.raises(StorageError, match=rf"{s3_url}/{gone}"):
        stream.get_many(range(30))


def test_missing_dataset(memory_url):
    with pytest.raises(StorageError, match="no trainkit dataset"):
        Stream(memory_url)


def test_cli_write_and_info(tmp_path, capsys):
    from trainkit.data.__main__ import main

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(30):
        d = src / ("sub" if i % 2 else "")
        (d / f"k{i:03d}.txt").write_text(f"text {i}")
        (d / f"k{i:03d}.cls").write_bytes(bytes([i]))
    url = "file://" + str(tmp_path / "out")
    # once for real, as a module
    r = subprocess.run([sys.executable, "-m", "trainkit.data", "write", str(src), url, "--shard-bytes", "200"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "30 samples" in r.stdout
    stream = Stream(url)
    assert stream.num_shards > 3
    keys = sorted(stream[i]["__key__"] for i in range(30))
    assert "sub/k001" in keys and "k000" in keys
    s = next(stream[i] for i in range(30) if stream[i]["__key__"] == "sub/k007")
    assert s["txt"] == b"text 7" and s["cls"] == bytes([7])
    capsys.readouterr()
    assert main(["info", url]) == 0
    out = capsys.readouterr().out
    assert "samples   30" in out and "txt: bytes" in out
    assert main(["info", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 30
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "no trainkit dataset" in capsys.readouterr().err
    (src / "odd.only").write_text("x")  # a sample with other extensions
    assert main(["write", str(src), "file://" + str(tmp_path / "out2")]) == 2
    assert "--no-group" in capsys.readouterr().err
    assert main(["write", str(src), "file://" + str(tmp_path / "out3"), "--no-group"]) == 0
    assert len(Stream("file://" + str(tmp_path / "out3"))) == 61
