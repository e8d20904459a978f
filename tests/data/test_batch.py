"""Batched reads (format version 2): one tensor per fixed-shape field straight from the mapped
shard, the same values as decoding sample by sample; version-1 datasets still read."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import run_loaders
from trainkit.data import Loader, Stream, default_collate, write_shards
from trainkit.errors import ConfigError

V1_DATASET = Path(__file__).parent / "fixtures" / "v1-dataset"


def v1_samples():
    """What tests/data/fixtures/v1-dataset holds: written by trainkit before format version 2."""
    for i in range(40):
        yield {"id": i, "x": torch.full((4,), float(i)), "h": torch.full((2,), i, dtype=torch.bfloat16),
               "y": np.arange(3, dtype=np.int16) + i, "v": torch.arange(i % 3 + 1, dtype=torch.int32),
               "raw": bytes([i]) * (i % 5), "name": f"s-{i}", "f": i / 2, "b": i % 2 == 0}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def expected_batch(ids) -> dict:
    samples = list(v1_samples())
    return default_collate([{**samples[i], "y": torch.from_numpy(samples[i]["y"])} for i in ids])


def test_version_1_dataset_still_reads():
    index = json.loads((V1_DATASET / "index.json").read_text())
    assert index["version"] == 1 and (V1_DATASET / "shard-000000.tks").read_bytes()[:8] == b"TKSHARD1"
    stream = Stream(str(V1_DATASET), shuffle_window=2)
    for i in range(40):
        assert_same(default_collate([stream[i]]), expected_batch([i]))
    ids = [5, 8, 11, 14, 17, 2]  # across shards, "v" of one shape
    assert_same(stream.read_batch(ids), expected_batch(ids))
    assert [s["id"] for s in stream.get_many(ids)] == ids
    seq, state = run_loaders(stream, world=2, workers=2, batch_size=4, steps=10, seed=2, transform=_drop_v)
    assert sorted(seq) == list(range(40)) and state["position"] == 40


def _drop_v(s):
    return {k: v for k, v in s.items() if k != "v"}


def test_new_datasets_are_version_2_with_columns(tmp_path):
    url = "file://" + str(tmp_path / "ds")
    index = write_shards(v1_samples(), url, shard_bytes=600)
    assert index["version"] == 2 and index["num_shards"] > 3
    stream = Stream(url)
    raw = (tmp_path / "ds" / index["shards"][0]["name"]).read_bytes()
    assert raw[:8] == b"TKSHARD2"
    h = stream.state(0)
    layout = {name: col["layout"] for name, col in zip(h.schema, h.columns)}
    assert layout == {"id": "fixed", "x": "fixed", "h": "fixed", "y": "fixed", "v": "var", "raw": "var",
                      "name": "var", "f": "fixed", "b": "fixed"}
    assert h.columns[1]["shape"] == [4] and all(c.get("at", 0) % 64 == 0 for c in h.columns)
    for i in range(40):
        assert_same(default_collate([stream[i]]), expected_batch([i]))
    rng = np.random.default_rng(0)
    for _ in range(20):  # batches spanning shards, in any order, one shard, one sample
        ids = rng.choice(40, size=int(rng.integers(1, 12)), replace=False)
        same_v = {int(i) % 3 for i in ids}
        if len(same_v) == 1:
            assert_same(stream.read_batch(ids), expected_batch(ids))
        else:  # "v" varies in shape: as with default_collate, stacking it is refused
            with pytest.raises(ConfigError, match="'v'.*different shapes"):
                stream.read_batch(ids)
    assert_same(stream.read_batch([3]), expected_batch([3]))
    first = [i for i in range(index["shards"][0]["samples"]) if i % 3 == 0][::-1]  # one shard, backwards
    assert len(first) > 1
    assert_same(stream.read_batch(first), expected_batch(first))


def test_variable_shapes_still_work_with_a_transform(tmp_path):
    url = "file://" + str(tmp_path / "ds")
    write_shards(v1_samples(), url, shard_bytes=600)
    stream = Stream(url)

    def pad(s):
        return {"id": s["id"], "v": torch.nn.functional.pad(s["v"], (0, 3 - len(s["v"])))}

    ld = Loader(stream, batch_size=8, rank=0, world_size=1, transform=pad)
    batch = next(iter(ld))
    ids = stream.ids_at(0, 0, 8).tolist()
    assert batch["id"].tolist() == ids
    assert batch["v"].tolist() == [list(range(i % 3 + 1)) + [0] * (2 - i % 3) for i in ids]


def _task_samples(name: str, n: int):
    if name == "resnet":
        from trainkit.tasks.resnet import samples

        split = dict(samples({"image_size": 16}))["train"]
    else:
        from trainkit.tasks.gpt import samples

        split = dict(samples({"seq_len": 32, "corpus_bytes": 64 << 10}))["train"]
    return list(itertools.islice(split, n))


@pytest.mark.parametrize("task", ["resnet", "gpt"])
@pytest.mark.parametrize("workers", [0, 2])
def test_recipe_batches_are_unchanged(task, workers, tmp_path):
    """The recipes' batches (hence their losses) are the same from the batched read as from
    decoding each sample and collating, on either side of an epoch boundary."""
    url = "file://" + str(tmp_path / task)
    write_shards(_task_samples(task, 300), url, shard_bytes=8 << 10)
    stream = Stream(url, shuffle_window=3)
    fast = Loader(stream, batch_size=32, rank=1, world_size=2, seed=4, num_workers=workers)
    slow = Loader(stream, batch_size=32, rank=1, world_size=2, seed=4, collate=lambda xs: default_collate(xs))
    a, b = iter(fast), iter(slow)
    try:
        for _ in range(25):  # 25 x 32 = 800 positions: more than two epochs
            x, y = next(a), next(b)
            assert_same(x, y)
            if workers:  # copied out of the workers' ring: no shared-memory segment per tensor
                assert not any(t.is_shared() for t in x.values())
    finally:
        a.close(), b.close()


def test_shared_and_pinned_allocation(tmp_path):
    url = "file://" + str(tmp_path / "ds")
    write_shards(map(_drop_v, v1_samples()), url, shard_bytes=600)
    stream = Stream(url)
    batch = stream.read_batch([0, 3, 6], shared=True)
    assert batch["x"].is_shared() and batch["y"].is_shared() and batch["id"].is_shared()
    if not torch.cuda.is_available():
        pytest.skip("pinned memory needs CUDA")
    batch = stream.read_batch([0, 3, 6], pin=True)
    assert batch["x"].is_pinned() and batch["y"].is_pinned() and batch["b"].is_pinned()
    got = next(iter(Loader(stream, batch_size=4, rank=0, world_size=1, device="cuda")))
    assert got["x"].is_cuda
    assert_same({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in got.items()},
                stream.read_batch(stream.ids_at(0, 0, 4)))


def _layouts(i: int) -> dict:
    """``v`` is fixed-shape in the shard of samples 0-5 and varies in the others (odd ids longer)."""
    return {"id": i, "v": torch.arange(2 + (i >= 6 and i % 2), dtype=torch.int16) + i,
            "x": torch.full((3,), float(i))}


def test_batches_read_while_shards_arrive_equal_read_batch(tmp_path):
    """Stream.read_batches fills batches shard by shard (the first shard here decides a layout
    the next one does not fit: that batch is built again); each equals read_batch's and the
    collate of the decoded samples, on a cold cache and read in place."""
    batches = [[0, 12, 3, 14], [5, 8], [20, 1, 16], [11]]
    for url in ("memory://layouts", "file://" + str(tmp_path / "layouts")):
        write_shards(map(_layouts, range(30)), url, shard_bytes=260)
        stream = Stream(url, cache_dir=str(tmp_path / "cache"), prefetch=0, shuffle=False)
        assert stream.shards[0].num_samples == 6
        got = stream.read_batches(batches)
        for ids, b in zip(batches, got):
            assert_same(b, default_collate(stream.get_many(ids)))
            assert_same(b, stream.read_batch(ids))
