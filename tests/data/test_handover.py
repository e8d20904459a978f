"""The ring that hands DataLoader workers' batches to the main process (trainkit.data.handover)."""

from __future__ import annotations

import threading

import torch

from data_helpers import make_samples
from trainkit.data import Loader, Stream, write_shards
from trainkit.data.handover import InRing, Ring


def _batch(k: int, n: int = 5) -> dict:
    return {"x": torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + k,
            "flags": torch.tensor([k % 2 == 0] * n), "tag": [f"b{k}"] * n}


def test_a_slot_is_not_rewritten_before_its_batch_is_taken():
    ring = Ring(2, 1024)
    sent = [ring.put(k, _batch(k)) for k in (0, 1)]
    assert isinstance(sent[0]["x"], InRing) and sent[0]["tag"] == ["b0"] * 5
    done = threading.Event()
    third: list = []

    def produce() -> None:
        third.append(ring.put(2, _batch(2)))  # slot 0: batch 0 is not taken yet
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    assert not done.wait(0.2)
    got = ring.take(0, sent[0])
    assert torch.equal(got["x"], _batch(0)["x"]) and torch.equal(got["flags"], _batch(0)["flags"])
    t.join(10)
    assert done.is_set()
    for k, b in ((1, sent[1]), (2, third[0])):
        got = ring.take(k, b)
        assert torch.equal(got["x"], _batch(k)["x"]) and got["tag"] == [f"b{k}"] * 5


def test_what_does_not_fit_goes_the_default_way():
    ring = Ring(3, 128)
    big = torch.ones(100, dtype=torch.int64)  # 800 bytes
    sent = ring.put(0, {"big": big, "small": torch.arange(4)})
    assert sent["big"] is big and isinstance(sent["small"], InRing)
    got = ring.take(0, sent)
    assert got["big"] is big and torch.equal(got["small"], torch.arange(4))
    ring.close()
    assert ring.put(3, {"small": torch.arange(4)}) is not None  # slot 0's batch 0 was taken
    assert ring.put(4, {"small": torch.arange(4)}) is None  # slot 1's batch 1 never was: closed ends the wait


def _ragged(sample: dict) -> dict:
    """A variable-shape field (its length depends on the sample) next to fixed ones."""
    n = 1 + sample["id"] % 4
    return {"id": sample["id"], "seq": torch.full((n,), sample["id"], dtype=torch.int16), "name": sample["name"]}


def _pad(samples: list[dict]) -> dict:
    seq = torch.zeros(len(samples), 4, dtype=torch.int16)
    for r, s in enumerate(samples):
        seq[r, : len(s["seq"])] = s["seq"]
    return {"id": torch.tensor([s["id"] for s in samples]), "seq": seq, "name": [s["name"] for s in samples]}


def test_workers_batches_equal_in_process_ones(tmp_path):
    """Through the ring (2 workers) and without workers: the same batches, value for value,
    for the batched read and for a transform + collate of variable-shape fields."""
    url = "file://" + str(tmp_path / "ds")
    write_shards(make_samples(120, payload=30), url, shard_bytes=2000)
    stream = Stream(url, shuffle_window=3)
    for kw in ({}, {"transform": _ragged, "collate": _pad}):
        runs = []
        for workers in (0, 2):
            it = iter(Loader(stream, batch_size=8, rank=0, world_size=1, num_workers=workers, seed=4, **kw))
            runs.append([next(it) for _ in range(20)])
            it.close()
        for a, b in zip(*runs):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
                else:
                    assert a[key] == b[key], key
