"""Sample-id accounting: exactly once per epoch across ranks x workers, exact elastic resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_helpers import expected_sequence, run_loaders
from trainkit.data import Loader, Stream
from trainkit.errors import ConfigError


@pytest.fixture(scope="module")
def stream(small_dataset):
    return Stream(small_dataset, shuffle_window=3)


def test_order_is_a_permutation_and_pure(stream, small_dataset):
    n = len(stream)
    assert n == 240 and stream.num_shards > 6
    o = stream.order(7, 0)
    assert sorted(o.tolist()) == list(range(n))
    # a pure function of (seed, epoch, index): a fresh Stream agrees, element by element
    other = Stream(small_dataset, shuffle_window=3)
    assert np.array_equal(other.order(7, 0), o)
    assert [stream.sample_id(7, 0, i) for i in (0, 1, 100, n - 1)] == [o[0], o[1], o[100], o[n - 1]]
    # two epochs differ, two seeds differ
    assert not np.array_equal(stream.order(7, 1), o)
    assert not np.array_equal(stream.order(8, 0), o)
    # global positions chain epochs
    assert stream.ids_at(7, n - 5, n + 5).tolist() == o[-5:].tolist() + stream.order(7, 1)[:5].tolist()


def test_windows_keep_shards_together(stream):
    """Within a window of 3 shards, only those shards' samples appear (bounded working set)."""
    plan = stream._order.plan(3, 0)
    for w, shards in enumerate(plan.windows):
        ids = plan.window_ids(w)
        owners = {stream.shard_of(int(i))[0] for i in ids}
        assert owners == set(int(s) for s in shards)


def test_no_shuffle_is_sequential(small_dataset):
    s = Stream(small_dataset, shuffle=False)
    assert s.order(1, 0).tolist() == list(range(len(s)))


def test_two_ranks_two_workers_exactly_once(stream):
    n = len(stream)
    # batch 24 = 2 ranks x 2 micro-steps x 6; 10 steps = one epoch
    seq, state = run_loaders(stream, world=2, workers=2, batch_size=24, grad_accum=2, steps=10, seed=5)
    assert sorted(seq) == list(range(n))
    assert seq == expected_sequence(stream, 5, 0, n)
    assert state["position"] == n and state["seed"] == 5


def test_batches_straddle_epochs(stream):
    n = len(stream)  # 240; batch 36 does not divide it: 7 steps = 252 positions
    seq, state = run_loaders(stream, world=2, workers=0, batch_size=36, steps=7, seed=1)
    assert seq == expected_sequence(stream, 1, 0, 252)
    assert Counter(seq[:n]) == Counter(range(n))  # the first epoch exactly once
    assert state["position"] == 252


@pytest.mark.parametrize("world,workers", [(3, 1), (1, 3)])
def test_resume_with_other_world_size_and_workers(stream, world, workers):
    n = len(stream)
    first, state = run_loaders(stream, world=2, workers=2, batch_size=12, steps=7, seed=11)
    assert state["position"] == 84
    rest, end = run_loaders(stream, world=world, workers=workers, batch_size=12, steps=13, seed=999, state=state)
    assert end["position"] == n and end["seed"] == 11  # the saved seed wins
    together = first + rest
    assert sorted(together) == list(range(n)), "union must be exactly the epoch"
    assert together == expected_sequence(stream, 11, 0, n)


def test_same_seed_same_order_any_world_size(stream):
    a, _ = run_loaders(stream, world=1, workers=0, batch_size=24, steps=12, seed=3)
    b, _ = run_loaders(stream, world=4, workers=0, batch_size=24, steps=12, seed=3)
    c, _ = run_loaders(stream, world=2, workers=0, batch_size=24, grad_accum=3, steps=12, seed=3)
    assert a == b == c
    assert a[: len(stream)] != a[len(stream) : 2 * len(stream)]  # epochs differ


def test_state_dict_is_small_json(stream):
    import json

    ld = Loader(stream, batch_size=8, rank=1, world_size=2)
    it = iter(ld)
    next(it), next(it)
    st = ld.state_dict()
    assert json.loads(json.dumps(st)) == st
    assert st["position"] == 16 and ld.epoch == 0 and ld.position == 16
    it.close()


def test_state_from_other_dataset_is_refused(stream):
    ld = Loader(stream, batch_size=8, rank=0, world_size=1)
    with pytest.raises(ConfigError, match="240"):
        ld.load_state_dict({"position": 5, "seed": 0, "num_samples": 100})


def test_bad_batch_size(stream):
    with pytest.raises(ConfigError, match="multiple"):
        Loader(stream, batch_size=10, rank=0, world_size=3)
    with pytest.raises(ConfigError, match="rank"):
        Loader(stream, batch_size=12, rank=3, world_size=3)


def test_transform_and_custom_collate(stream):
    ld = Loader(stream, batch_size=4, rank=0, world_size=1, transform=lambda s: {"id2": s["id"] * 2},
                collate=lambda xs: [x["id2"] for x in xs])
    batch = next(iter(ld))
    assert batch == [2 * i for i in stream.ids_at(0, 0, 4).tolist()]


@pytest.mark.parametrize("window,shuffle", [(3, True), (1, True), (5, False)])
def test_cache_questions_in_o_ahead_and_o_cached(window, shuffle):
    """The prefetch schedule and the eviction's next uses, computed from the windows ahead and
    for the cached shards only, agree with sorting every shard's next use."""
    from trainkit.data.order import Order

    rng = np.random.default_rng(0)
    counts = rng.integers(5, 30, size=23)
    order = Order(counts, window, shuffle)
    n = order.num_samples
    for position in list(rng.integers(0, 3 * n, size=40)) + [0, n - 1, n, 2 * n - 1]:
        position = int(position)
        nu = order.next_use(7, position)
        some = rng.choice(23, size=6, replace=False)
        assert np.array_equal(order.next_use_of(7, position, some), nu[some])
        for ahead in (0, 4, 30):
            got = order.upcoming(7, position, ahead)
            now = int((nu <= position).sum())
            want = np.argsort(nu, kind="stable")[: now + ahead]
            assert len(set(got.tolist())) == len(got) == len(want)
            # the same shards; within a window of equal next use the order may differ
            assert sorted(nu[got].tolist()) == sorted(nu[want].tolist())
            assert set(got[:now].tolist()) == set(want[:now].tolist())
