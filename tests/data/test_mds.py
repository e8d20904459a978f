"""mosaic MDS datasets, as mosaicml-streaming 0.13's own MDSWriter writes them, read by trainkit.

The values are checked against mosaicml-streaming's own MDSReader, so what is tested is the
real format, not trainkit's idea of it. The order/cache/corruption/fault contract over every
store is in test_readers.py.
"""

from __future__ import annotations

import io
import json
import os
from decimal import Decimal

import numpy as np
import pytest
import torch

from data_helpers import check_sample, make_samples, write_mds
from trainkit.data import Stream, default_collate, write_shards
from trainkit.errors import ConfigError, StorageError

N = 60
EVERY = {"i": "int", "i8": "int8", "u16": "uint16", "u32": "uint32", "i64": "int64", "f16": "float16",
         "f32": "float32", "f64": "float64", "s": "str", "b": "bytes", "j": "json", "si": "str_int",
         "sf": "str_float", "sd": "str_decimal", "nd": "ndarray", "ndt": "ndarray:int32", "ndf": "ndarray:float64:2,3",
         "png": "png"}


def _png(i: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (2, 2), (i, 0, 255 - i)).save(out, format="PNG")
    return out.getvalue()


def _every(i: int) -> dict:
    return {"i": i, "i8": -(i % 100), "u16": 60000 + i, "u32": 4_000_000_000 + i, "i64": -(1 << 40) - i,
            "f16": i / 2, "f32": i / 8, "f64": i / 3, "s": f"sample {i} é", "b": bytes([i]) * (i % 5),
            "j": {"id": i, "tags": ["a"] * (i % 3)}, "si": i * 7, "sf": i + 0.25, "sd": Decimal(f"{i}.10"),
            "nd": np.full((i % 3 + 1, 2), i, dtype=np.uint16), "ndt": np.arange(i % 4 + 1, dtype=np.int32),
            "ndf": np.full((2, 3), i / 10), "png": _png(i)}


def _mosaic_samples(folder: str) -> list[dict]:
    """Every sample as mosaicml-streaming's MDSReader decodes it."""
    from streaming.base.format.mds.reader import MDSReader

    out = []
    for shard in json.load(open(os.path.join(folder, "index.json")))["shards"]:
        reader = MDSReader.from_json(folder, None, shard)
        out += [reader.decode_sample(reader.get_sample_data(j)) for j in range(shard["samples"])]
    return out


def _same(ours, theirs, name: str) -> None:
    if isinstance(theirs, np.ndarray):
        assert isinstance(ours, torch.Tensor) and ours.numpy().dtype == theirs.dtype, name
        assert np.array_equal(ours.numpy(), theirs), name
    elif name == "png":  # mosaic decodes to a PIL image; trainkit hands over the encoded bytes
        from PIL import Image

        assert isinstance(ours, bytes) and np.array_equal(np.asarray(Image.open(io.BytesIO(ours))),
                                                          np.asarray(theirs)), name
    else:
        assert ours == theirs and type(ours) in (int, float, str, bytes, dict, Decimal), (name, ours, theirs)


def test_every_encoding_reads_as_mosaic_reads_it(tmp_path):
    url = write_mds("file://" + str(tmp_path / "every"), (_every(i) for i in range(N)), EVERY, size_limit=4000)
    stream = Stream(url)
    assert stream.format == "mds" and len(stream) == N and stream.num_shards > 3
    assert stream.schema["i"] == {"kind": "int"} and stream.schema["ndf"] == {"kind": "ndarray", "dtype": "float64"}
    theirs = _mosaic_samples(str(tmp_path / "every"))
    for i, (ours, want) in enumerate(zip(stream.get_many(range(N)), theirs)):
        assert ours.keys() == want.keys()
        for name in want:
            _same(ours[name], want[name], name)
    ids = [48, 36, 24, 12, 0]  # across shards, out of order; "nd" and "ndt" have one shape where i % 12 agrees
    got, want = stream.read_batch(ids), default_collate(stream.get_many(ids))
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], torch.Tensor):
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        else:
            assert got[k] == want[k], k
    with pytest.raises(ConfigError, match="'nd': samples of different shapes"):  # as default_collate would
        stream.read_batch([1, 2])


def test_found_at_the_url_or_chosen_by_format(tmp_path):
    mds = write_mds("file://" + str(tmp_path / "mds"), make_samples(40))
    assert Stream(mds).format == "mds" and Stream(mds, format="mds").num_shards == Stream(mds).num_shards
    check_sample(Stream(mds, format="mds")[39], 39)
    with pytest.raises(StorageError, match="not a trainkit shard index"):
        Stream(mds, format="trainkit")
    ours = "file://" + str(tmp_path / "trainkit")
    write_shards(make_samples(10), ours)
    with pytest.raises(StorageError, match=r"index.json: not an MDS index"):
        Stream(ours, format="mds")


@pytest.mark.parametrize("compression", ["zstd", "gz"])
def test_compressed_shards_and_fixed_size_samples(tmp_path, compression):
    """Only fixed-size columns (an image, a label, an id): each shard is read as one
    (samples x bytes) array; compressed shards are decompressed when opened."""
    cols = {"id": "int64", "image": "ndarray:uint8:8,8,3", "label": "int16"}
    samples = [{"id": i, "image": ((np.arange(192) + i) % 256).astype(np.uint8).reshape(8, 8, 3), "label": i % 10}
               for i in range(N)]
    plain = Stream(write_mds("file://" + str(tmp_path / "plain"), samples, cols, size_limit=2000))
    packed = Stream(write_mds("file://" + str(tmp_path / "packed"), samples, cols, size_limit=2000,
                              compression=compression))
    assert packed.num_shards == plain.num_shards > 3 and packed.shards[0].url.endswith(f".mds.{compression}")
    ids = [59, 0, 31, 7, 44, 45]
    want = default_collate([{"id": i, "image": torch.from_numpy(samples[i]["image"]), "label": i % 10} for i in ids])
    for stream in (plain, packed):
        got = stream.read_batch(ids)
        assert got["image"].dtype == torch.uint8 and got["image"].shape == (6, 8, 8, 3)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        assert stream[31]["label"] == 1 and torch.equal(stream[31]["image"], want["image"][2])


def test_pickled_columns_are_refused(tmp_path):
    url = write_mds("file://" + str(tmp_path / "pkl"), ({"id": i, "obj": {"x": i}} for i in range(5)),
                    {"id": "int", "obj": "pkl"})
    with pytest.raises(ConfigError) as info:
        Stream(url)
    assert str(info.value) == (f"{url}: MDS column 'obj' is pickled (encoding 'pkl'); trainkit never unpickles data "
                               "from storage: rewrite it with another encoding (ndarray, json, bytes)")


def test_an_encoding_trainkit_does_not_read_is_named(tmp_path):
    from PIL import Image

    url = write_mds("file://" + str(tmp_path / "pil"), ({"im": Image.new("L", (2, 2))} for _ in range(3)), {"im": "pil"})
    with pytest.raises(ConfigError, match=r"^.*MDS column 'im' has encoding 'pil', which trainkit does not read \("):
        Stream(url)


def test_without_hashes_a_broken_shard_still_names_its_url(tmp_path):
    """The writer's default: no hashes. The shard's own header (sample count, offsets) is
    checked against index.json and against its size."""
    folder = tmp_path / "nohash"
    url = write_mds("file://" + str(folder), make_samples(N), hashes=())
    stream = Stream(url)
    assert not any(s.sha256 for s in stream.shards)
    last = stream.shards[-1]
    path = folder / last.url.rsplit("/", 1)[1]
    data = bytearray(path.read_bytes())
    data[0:4] = np.uint32(last.num_samples + 1).tobytes()
    path.write_bytes(bytes(data))
    check_sample(stream[0], 0)
    with pytest.raises(StorageError, match=rf"^{last.url}: corrupt shard: {last.num_samples + 1} samples, index.json says"):
        stream[N - 1]
    data[0:4] = np.uint32(last.num_samples).tobytes()
    data[8:12] = np.uint32(len(data) * 2).tobytes()  # the second sample's start, beyond the file
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=rf"^{last.url}: corrupt shard: sample offsets"):
        Stream(url)[N - 1]
