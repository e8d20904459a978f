"""The node-local shard cache: bounded, Belady eviction by the known order, crash-safe."""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
import time

import pytest

from data_helpers import check_sample, make_samples, run_loaders
from trainkit import storage
from trainkit.data import Stream, write_shards
from trainkit.errors import ConfigError


class DirMonitor:
    """Samples the bytes on disk in a cache directory (all files, temp files included)."""

    def __init__(self, path) -> None:
        self.path, self.max, self.samples = path, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                # the cache changes its listing only under this lock: a consistent snapshot
                with open(os.path.join(self.path, ".lock"), "a+b") as lock:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                    try:
                        for e in os.scandir(self.path):
                            if e.name != ".lock":
                                try:
                                    total += e.stat().st_size
                                except FileNotFoundError:
                                    pass
                    finally:  # explicit: a forked child may share this open file
                        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            except FileNotFoundError:
                pass
            self.max = max(self.max, total)
            self.samples += 1
            self._stop.wait(0.0005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


@pytest.fixture(scope="module")
def big_memory_dataset():
    url = "memory://trainkit-test/cache-ds"
    index = write_shards(make_samples(480, payload=300), url, shard_bytes=4000)
    return url, index


def test_bound_and_refetch_accounting(big_memory_dataset, tmp_path):
    url, index = big_memory_dataset
    n_shards, total = index["num_shards"], index["total_bytes"]
    largest = max(s["bytes"] for s in index["shards"])
    bound = 10 * largest
    assert total > 4 * bound  # the data is several times larger than the cache
    stream = Stream(url, cache_dir=str(tmp_path), cache_bytes=bound, shuffle_window=2, prefetch=0)
    cache = stream.cache
    with DirMonitor(stream.cache_dir) as mon:
        seq, state = run_loaders(stream, world=2, workers=0, batch_size=24, steps=20, seed=9)
        assert sorted(seq) == list(range(480)) and state["position"] == 480
        # epoch 1: every shard exactly once
        assert sorted(cache.fetched) == list(range(n_shards))
        present = {i for i, s in enumerate(stream.shards) if (stream.cache_dir / s.local_name).exists()}
        assert present and len(present) < n_shards
        f0, e0 = len(cache.fetched), len(cache.evicted)
        seq2, _ = run_loaders(stream, world=2, workers=0, batch_size=24, steps=20, seed=9, state=state)
        assert sorted(seq2) == list(range(480))
    fetched2, evicted2 = cache.fetched[f0:], set(cache.evicted[e0:])
    # epoch 2 refetches only what was not there (or was evicted first), each at most once
    assert len(fetched2) == len(set(fetched2))
    assert set(range(n_shards)) - present <= set(fetched2)
    assert set(fetched2) <= (set(range(n_shards)) - present) | (present & evicted2)
    assert len(fetched2) < n_shards
    assert mon.samples > 10 and 0 < mon.max <= bound, (mon.max, bound)
    assert cache.usage() <= bound


def test_cache_larger_than_data_fetches_once(big_memory_dataset, tmp_path):
    url, index = big_memory_dataset
    stream = Stream(url, cache_dir=str(tmp_path), cache_bytes=10 * index["total_bytes"], shuffle_window=4,
                    prefetch=4)
    run_loaders(stream, world=1, workers=0, batch_size=40, steps=36, seed=2)  # 3 epochs
    assert sorted(stream.cache.fetched) == list(range(index["num_shards"]))
    assert stream.cache.stats["evictions"] == 0


def test_bound_with_prefetch_and_workers(big_memory_dataset, tmp_path):
    """Two DataLoader workers share one directory; prefetch on; the bound still holds."""
    url, index = big_memory_dataset
    largest = max(s["bytes"] for s in index["shards"])
    bound = 12 * largest
    stream = Stream(url, cache_dir=str(tmp_path), cache_bytes=bound, shuffle_window=2, prefetch=3)
    with DirMonitor(stream.cache_dir) as mon:
        seq, _ = run_loaders(stream, world=2, workers=2, batch_size=24, steps=40, seed=1)
    assert sorted(seq) == sorted(list(range(480)) * 2)
    assert 0 < mon.max <= bound, (mon.max, bound)


def test_crashed_attempt_cannot_poison(big_memory_dataset, tmp_path):
    url, index = big_memory_dataset
    dead = subprocess.Popen(["true"])
    dead.wait()
    stream = Stream(url, cache_dir=str(tmp_path), cache_bytes=1 << 20)
    first = stream.shards[0]
    junk = stream.cache_dir / f".tmp.{first.name}.{first.bytes}.{dead.pid}.dead"
    junk.write_bytes(b"half a shard")
    check_sample(stream[0], 0, payload=300)  # fetched afresh, verified
    assert not junk.exists()
    assert stream.cache.stats["stale_removed"] == 1
    # a live process's download in flight is respected (its reservation counts)
    live = stream.cache_dir / f".tmp.other.5000.{os.getpid()}.live"
    live.write_bytes(b"x")
    assert stream.cache.usage() >= first.bytes + 5000
    live.unlink()


def test_cache_smaller_than_a_shard_is_refused(big_memory_dataset, tmp_path):
    url, _ = big_memory_dataset
    with pytest.raises(ConfigError, match="largest shard"):
        Stream(url, cache_dir=str(tmp_path), cache_bytes=100)
    with pytest.warns(UserWarning, match="shuffle window"):
        Stream(url, cache_dir=str(tmp_path), cache_bytes=9000, shuffle_window=8)


def test_dataset_change_does_not_reuse_stale_files(tmp_path):
    url = "memory://trainkit-test/changing"
    write_shards(make_samples(20), url, shard_bytes=1000)
    s1 = Stream(url, cache_dir=str(tmp_path))
    s1.get_many(range(20))
    write_shards(({**s, "name": "v2"} for s in make_samples(20)), url, shard_bytes=1000)
    s2 = Stream(url, cache_dir=str(tmp_path))
    assert s2[3]["name"] == "v2"


def test_a_demanded_shard_is_handed_over_open_while_neighbours_evict_it(big_memory_dataset, tmp_path):
    """Two readers of one cache directory (as two loader workers are) with room for one shard,
    each demanding its own shard over and over: every demand evicts the other's. Each still
    gets its shard, whole, every time: the fetch hands it over as a file opened under the lock
    evictions take, not as a path the neighbour may empty before it is opened."""
    url, index = big_memory_dataset
    largest = max(s["bytes"] for s in index["shards"])
    streams = [Stream(url, cache_dir=str(tmp_path), cache_bytes=largest, shuffle_window=2, prefetch=0)
               for _ in range(2)]
    fs, _ = storage.filesystem(url)
    want = [fs.cat_file(storage.filesystem(streams[0].shards[i].url)[1]) for i in range(2)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def demand(k: int) -> None:
        start.wait()
        try:
            for _ in range(100):
                with streams[k].cache.open(k) as f:
                    time.sleep(0.001)  # the neighbour's demand evicts it meanwhile
                    assert f.read() == want[k]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=demand, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(s.cache.stats["evictions"] for s in streams) > 10  # they did take the room from each other


def test_a_shard_being_read_keeps_its_mapping_and_holds_up_no_other(big_memory_dataset, tmp_path):
    """A long read of one mapped shard (a fill of a window's batches) must not keep the threads
    that map what they just fetched waiting, and a drop of that shard meanwhile (the window
    moved on, an eviction) closes its mapping only once the read is over."""
    url, index = big_memory_dataset
    stream = Stream(url, cache_dir=str(tmp_path), shuffle_window=2, prefetch=0)
    fs, _ = storage.filesystem(url)
    want = fs.cat_file(storage.filesystem(stream.shards[0].url)[1])
    inside, go = threading.Event(), threading.Event()
    got: list = []

    def long_read(buf, _state):
        inside.set()
        go.wait(30)
        got.append((buf, bytes(buf[:])))

    reader = threading.Thread(target=stream._read, args=(0, long_read))
    reader.start()
    assert inside.wait(30)
    others = threading.Thread(target=lambda: (stream._mapping(1), stream._drop_map(0)))
    others.start()
    others.join(5)
    held_up = others.is_alive()
    go.set()
    reader.join(30)
    others.join(30)
    assert not held_up, "mapping another shard waited for a read of shard 0 to end"
    (buf, data), = got
    assert data == want  # read whole after its mapping was dropped
    assert buf.closed and 0 not in stream._maps  # and closed once the read was over
    stream.close()
