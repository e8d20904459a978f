"""The input pipeline's device path: one batch ahead, pinned, copied on a side stream.

Off CUDA the loader's output must be exactly what it was (the path is a no-op); the
one-ahead order is checked with plain functions; the CUDA cases need a GPU and are skipped
without one.
"""

from __future__ import annotations

import pytest
import torch

from trainkit.data import Loader, Stream, write_shards
from trainkit.data.prefetch import map_tensors, one_ahead, to_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    url = "file://" + str(tmp_path_factory.mktemp("ds") / "d")
    write_shards(({"x": torch.full((4,), float(i)), "id": i, "name": f"s{i}"} for i in range(96)), url,
                 shard_bytes=1000)
    return Stream(url)


def _ids(batches):
    return [b["id"].tolist() for b in batches]


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_one_ahead_keeps_order_and_reads_exactly_one_ahead():
    pulled = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield i

    staged = []
    gen = one_ahead(source(), stage=lambda b: (staged.append(b), b * 10)[1], ready=lambda b: b + 1)
    assert next(gen) == 1 and pulled == [0, 1] and staged == [0, 1]  # the next one is staged already
    assert next(gen) == 11 and pulled == [0, 1, 2]
    assert list(gen) == [21, 31, 41] and pulled == [0, 1, 2, 3, 4]
    assert list(one_ahead(iter([]), stage=lambda b: b, ready=lambda b: b)) == []


def test_map_tensors_reaches_nested_tensors_and_keeps_the_rest():
    batch = {"a": torch.ones(2), "b": [torch.zeros(1), "text"], "c": (torch.ones(1), 3), "d": b"raw"}
    out = map_tensors(lambda t: t + 1, batch)
    assert torch.equal(out["a"], torch.full((2,), 2.0)) and torch.equal(out["b"][0], torch.ones(1))
    assert out["b"][1] == "text" and isinstance(out["c"], tuple) and out["c"][1] == 3 and out["d"] == b"raw"


@pytest.mark.parametrize("workers", [0, 2])
def test_cpu_device_is_a_no_op(stream, workers):
    plain = Loader(stream, batch_size=8, rank=0, world_size=2, seed=3, num_workers=workers)
    on_cpu = Loader(stream, batch_size=8, rank=0, world_size=2, seed=3, num_workers=workers, device="cpu")
    a, b = _take(plain, 7), _take(on_cpu, 7)
    assert _ids(a) == _ids(b)
    for x, y in zip(a, b):
        assert torch.equal(x["x"], y["x"]) and x["name"] == y["name"]
        assert not y["x"].is_pinned()  # pinned only for a CUDA device
    assert plain.state_dict() == on_cpu.state_dict()
    assert list(to_device(iter(a), torch.device("cpu"))) == a  # passed through, the same objects


@cuda
@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_batches_arrive_on_the_device_in_order_and_the_position_counts_what_was_handed_out(stream, workers):
    device = torch.device("cuda", torch.cuda.current_device())
    host = Loader(stream, batch_size=8, rank=1, world_size=2, seed=5, num_workers=workers)
    gpu = Loader(stream, batch_size=8, rank=1, world_size=2, seed=5, num_workers=workers, device=device)
    a, b = _take(host, 9), _take(gpu, 9)
    assert all(y["x"].device == device and y["id"].device == device for y in b)
    assert _ids(a) == _ids(b)
    for x, y in zip(a, b):
        assert torch.equal(x["x"], y["x"].cpu()) and x["name"] == y["name"]
    # One batch was copied ahead, but the state counts the 9 handed out: a resume is exact.
    assert gpu.state_dict() == host.state_dict()
    resumed = Loader(stream, batch_size=8, rank=1, world_size=2, seed=5, num_workers=workers, device=device)
    resumed.load_state_dict(gpu.state_dict())
    assert _ids(_take(resumed, 3)) == _ids(_take(_continue(host, 9), 3))


def _continue(loader, skip):
    fresh = Loader(loader.stream, batch_size=loader.batch_size, rank=loader.rank, world_size=loader.world_size,
                   seed=loader.seed, num_workers=loader.num_workers)
    it = iter(fresh)
    for _ in range(skip):
        next(it)
    return it


@cuda
def test_cuda_batches_are_pinned_before_the_copy(stream):
    seen = []
    device = torch.device("cuda", torch.cuda.current_device())
    from trainkit.data.prefetch import pin

    host = _take(Loader(stream, batch_size=8, rank=0, world_size=1, seed=1), 3)
    pinned = [pin(b) for b in host]
    assert all(b["x"].is_pinned() for b in pinned)
    for b in to_device(iter(pinned), device):
        seen.append(b["x"].device)
    assert seen == [device] * 3
