"""``Stream``: random access to the samples of a sharded dataset at any fsspec URL."""

from __future__ import annotations

import logging
import math
import mmap
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from trainkit import storage
from trainkit.data.cache import LocalShards, ShardCache, ShardInfo, cache_dir_for, warn_small_cache
from trainkit.data.source import Source, open_source
from trainkit.data.order import Order
from trainkit.errors import ConfigError, StorageError


log = logging.getLogger(__name__)

CONNECTION_BYTES_PER_S = 100e6  # what one connection to an object store typically delivers
NODE_CONNECTIONS = 4  # connections that fill a node's link when latency is negligible
MAX_DOWNLOADS = 32
FOLLOW_WAIT = 1.0  # s a worker waits for its main process to start fetching a shard it needs


def downloads_for(shards: Sequence[ShardInfo], url: str) -> int:
    """Concurrent downloads that keep a node's link busy despite the time to first byte.

    A connection spends ``L + S/b`` per shard of ``S`` bytes (``L``: latency, ``b``: one
    connection's bandwidth) but transfers only ``S/b`` of it, so filling the link takes
    ``NODE_CONNECTIONS * (1 + L*b/S)`` connections. ``L`` is measured here by one metadata
    request for the first shard (on a warm connection: the index was just read); ``b`` is taken
    as 100 MB/s. E.g. 20 ms: 5 for 8 MB shards, 12 for 1 MB, 32 (the cap) for 64 KB. file://
    datasets are read in place: 0.
    """
    if storage.is_local(url) or not shards:
        return 0
    first = shards[0].url
    fs, path = storage.filesystem(first)
    t0 = time.perf_counter()
    storage.retry(lambda: fs.info(path), what=first)
    latency = time.perf_counter() - t0
    size = float(np.median([s.bytes for s in shards]))
    need = NODE_CONNECTIONS * (1 + latency * CONNECTION_BYTES_PER_S / max(size, 1.0))
    return int(min(MAX_DOWNLOADS, max(NODE_CONNECTIONS, math.ceil(need))))


class Stream:
    """A random-access sharded dataset (despite the name, not an iterator): ``len(stream)``
    samples, ``stream[sample_id]`` decodes one sample; the order is the Loader's.

    ``cache_dir``/``cache_bytes``: the node-local shard cache (default
    ``$TRAINKIT_CACHE_DIR`` or ``~/.cache/trainkit/data``, one subdirectory per URL).
    ``shuffle``/``shuffle_window``: the epoch order (see :mod:`trainkit.data.order`).
    ``prefetch``: concurrent shard downloads per rank (with DataLoader workers, run by the main
    process for them: see :meth:`follow`); shards are fetched ahead in order of first use, up
    to ``max(2 * prefetch, shuffle_window)`` beyond the current window, each only if it evicts
    nothing needed sooner. ``prefetch=0``:
    on demand only; ``None`` (default): sized from the shard size and the store's measured
    latency by :func:`downloads_for`.
    file:// datasets are read in place, without the cache. ``format``: the reader (a key of
    :data:`trainkit.data.source.READERS`: ``trainkit``, ``parquet``, ``arrow``, ``webdataset``,
    ``mds``; default: what is found at ``url``, see :func:`trainkit.data.source.open_source`).
    """

    def __init__(
        self,
        url: str,
        *,
        cache_dir: str | None = None,
        cache_bytes: int = 1 << 30,
        shuffle: bool = True,
        shuffle_window: int = 8,
        prefetch: int | None = None,
        verify: bool = True,
        format: str | None = None,
    ) -> None:
        if shuffle_window < 1:
            raise ConfigError(f"shuffle_window must be >= 1, got {shuffle_window}")
        if prefetch is not None and prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0, got {prefetch}")
        self.source: Source = open_source(url, format)
        self.url = self.source.url
        self.format = self.source.format
        self.schema: dict[str, dict[str, str]] = self.source.schema
        self.shards: list[ShardInfo] = self.source.shards
        # prefetch=None: NODE_CONNECTIONS downloads until downloads_for has measured the latency,
        # in a thread (its request overlaps the first downloads instead of delaying them)
        self._sizing: threading.Thread | None = None
        if prefetch is None:
            sized = not storage.is_local(self.url) and bool(self.shards)
            prefetch = NODE_CONNECTIONS if sized else 0
        else:
            sized = False
        self.shuffle, self.shuffle_window, self._prefetch = shuffle, shuffle_window, prefetch
        counts = np.array([s.num_samples for s in self.shards], dtype=np.int64)
        self._order = Order(counts, shuffle_window, shuffle)
        self._starts = self._order.starts
        self._seed = 0  # the seed whose order drives prefetch/eviction (set by the Loader)
        if storage.is_local(self.url):
            self.cache: ShardCache | LocalShards = LocalShards(self.shards, verify=verify)
            self.cache_dir = None
        else:
            self.cache_dir = cache_dir_for(self.url, cache_dir)
            self.cache = ShardCache(self.cache_dir, self.shards, cache_bytes, self._next_use, storage.filesystem,
                                    threads=max(1, prefetch), schedule_key=self._window_key,
                                    next_use_of=self._next_use_of, upcoming=self._upcoming,
                                    max_threads=MAX_DOWNLOADS if sized else None)
            if shuffle and self.shards:
                sizes = sorted((s.bytes for s in self.shards), reverse=True)
                warn_small_cache(cache_bytes, sum(sizes[:shuffle_window]))
        self._hlock = threading.Lock()
        self._maps: OrderedDict[int, tuple] = OrderedDict()  # shard -> (mmap, source state, path, inode)
        self._opening: dict[int, threading.RLock] = {}  # shard -> held while this process opens it
        self._reads: Counter[int] = Counter()  # id(mmap) -> reads of it in progress
        self._unmap: dict[int, mmap.mmap] = {}  # dropped while being read: closed when the last read ends
        self._maps_pid = os.getpid()
        self._map_key: tuple | None = None
        self._batch_shards = 0  # shards the batch being read touches: all stay mapped while it is
        self._follower = False  # a DataLoader worker: its main process fetches ahead (follow)
        self._window_shards: set[int] = set()  # those of the window the reader is in
        self._reading_pid = -1  # the process that reads samples (not one that only fetches for workers)
        if isinstance(self.cache, ShardCache):
            self.cache.on_evict = self._drop_map
            self.cache.on_fetched = self._open_fetched
            if sized:
                self._sizing = threading.Thread(target=self._size_downloads, name="trainkit-sizing", daemon=True)
                self._sizing.start()

    def _size_downloads(self) -> None:
        try:
            n = downloads_for(self.shards, self.url)
        except Exception as exc:  # noqa: BLE001 - the downloads themselves will say what is wrong
            log.debug("%s: latency not measured (%s); %d downloads", self.url, exc, self._prefetch)
            return
        self.cache.more_threads(n)
        self._prefetch = max(self._prefetch, n)

    @property
    def prefetch(self) -> int:
        """Concurrent downloads (once measured, when sized from the store)."""
        if self._sizing is not None:
            self._sizing.join()
        return self._prefetch

    # -- order -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._order.num_samples

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The sample ids of epoch ``epoch`` in order: a pure function of (seed, epoch)."""
        return self._order.plan(seed, epoch).order()

    def sample_id(self, seed: int, epoch: int, position: int) -> int:
        """``order(seed, epoch)[position]`` without building the whole order."""
        return int(self._order.plan(seed, epoch).ids(position, position + 1)[0])

    def ids_at(self, seed: int, lo: int, hi: int) -> np.ndarray:
        """Sample ids at GLOBAL positions [lo, hi): epoch ``p // len``, index ``p % len``."""
        return self._order.positions(seed, lo, hi)

    def _next_use(self, position: int) -> np.ndarray:
        return self._order.next_use(self._seed, max(0, position))

    def _next_use_of(self, position: int, shards: np.ndarray) -> np.ndarray:
        return self._order.next_use_of(self._seed, max(0, position), shards)

    def _upcoming(self, position: int, ahead: int) -> np.ndarray:
        return self._order.upcoming(self._seed, position, ahead)

    def window_key(self, position: int) -> tuple[int, int, int]:
        """(seed, epoch, window) of GLOBAL ``position`` in the order of the seed last advanced to."""
        return self._window_key(position)

    def _window_key(self, position: int) -> tuple[int, int, int]:
        epoch, idx = divmod(position, len(self))
        return self._seed, epoch, self._order.plan(self._seed, epoch).window_of(idx)

    @property
    def lookahead(self) -> int:
        """Shards beyond the current window that are fetched ahead."""
        return max(2 * self._prefetch, self.shuffle_window) if self._prefetch else 0

    def advance(self, seed: int, position: int, lag: int = 0) -> None:
        """Reader hint: global ``position`` reached (``lag``: how far other readers on this node
        may be behind, for eviction decisions); starts prefetching."""
        self._seed = seed
        self.cache.advance(position, 0 if self._follower else self.lookahead, max(0, position - lag))
        key = self._window_key(position)
        if key != self._map_key:  # a new window: unmap shards of earlier ones
            self._map_key = key
            plan = self._order.plan(seed, key[1])
            keep = {int(s) for s in plan.windows[key[2]]}
            self._window_shards = keep
            for i in [i for i in self._maps_for_pid() if i not in keep]:
                self._drop_map(i)

    def follow(self) -> None:
        """This process is one of a rank's DataLoader workers: their main process fetches ahead
        for them (:meth:`advance` called there), so they fetch nothing ahead, and a shard one
        needs is fetched by it only if the main process has not started it within
        ``FOLLOW_WAIT`` s (one store client per rank, not per worker)."""
        if isinstance(self.cache, ShardCache):
            self._follower = True
            self.cache.follow_wait = FOLLOW_WAIT

    # -- samples -----------------------------------------------------------------------
    def shard_of(self, sample_id: int) -> tuple[int, int]:
        if not 0 <= sample_id < len(self):
            raise IndexError(f"sample id {sample_id} outside [0, {len(self)})")
        i = int(np.searchsorted(self._starts, sample_id, side="right")) - 1
        return i, int(sample_id - self._starts[i])

    # Shards being read are memory-mapped (slicing needs no system call, which matters when
    # download threads compete for the GIL). A process maps at most the shards of its current
    # window plus a couple (or of the batch being read, when it straddles windows); a mapping is dropped when this process evicts the shard, when the
    # window moves on, or when the file is found unlinked (evicted by another process), so an
    # evicted shard's disk space is released promptly.
    def _maps_for_pid(self) -> OrderedDict:
        if self._maps_pid != os.getpid():  # after fork: the parent's mappings are not ours
            self._maps, self._maps_pid = OrderedDict(), os.getpid()
            self._hlock = threading.Lock()
            self._opening, self._reads, self._unmap = {}, Counter(), {}
        return self._maps

    def _drop_map(self, i: int) -> None:
        with self._hlock:
            m = self._maps_for_pid().pop(i, None)
            self._opening.pop(i, None)
            if m is not None:
                self._unmap_locked(m[0])

    def _unmap_locked(self, mm: mmap.mmap) -> None:
        """Closes a dropped mapping now, or when the reads in progress of it end (``_hlock`` held)."""
        if self._reads[id(mm)]:
            self._unmap[id(mm)] = mm
        else:
            _close(mm)

    def _open_fetched(self, shards: list[int]) -> None:
        """In the thread that just fetched them: the shards of the reader's current window are
        mapped and opened (parsed; Parquet: decoded) there, in parallel with the downloads still
        running, instead of in the reader once the last shard of the window has arrived. Only in
        a process that reads (not in one fetching for its DataLoader workers), and never raises:
        the reader opens a shard that failed here itself, and gets the error."""
        if self._reading_pid != os.getpid():
            return
        for i in shards:
            if i in self._window_shards:
                try:
                    self._mapping(i)
                except Exception as exc:  # noqa: BLE001 - raised again where the reader opens it
                    log.debug("opening %s after its fetch failed: %s", self.shards[i].url, exc)

    def _open_map(self, i: int) -> tuple[mmap.mmap, Any, str, int]:
        with self.cache.open(i) as f:
            # the page tables at once: not a fault per 4 KiB page on first touch
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
            ino = os.fstat(f.fileno()).st_ino
            path = f.name
        return mm, self.source.open(i, mm), path, ino

    def _mapping(self, i: int) -> tuple:
        self._reading_pid = os.getpid()
        maps = self._maps_for_pid()
        with self._hlock:
            m = maps.get(i)
            if m is not None:
                maps.move_to_end(i)
        if m is not None and not self._still_there(m):
            self._drop_map(i)
            self.cache.forget(i)
            m = None
        if m is None:
            self.cache.path(i)  # once it is here, the thread that fetched it may have opened it
            with self._opening_lock(i):  # the reader and the thread that fetched it: one opens it
                with self._hlock:
                    m = maps.get(i)
                if m is not None and self._still_there(m):
                    return m
                m = self._open_map(i)
                with self._hlock:
                    old = maps.pop(i, None)
                    maps[i] = m
                    # a batch that straddles windows needs all its shards mapped at once
                    while len(maps) > max(self.shuffle_window + 2, self._batch_shards):
                        gone, (mm_old, *_rest) = maps.popitem(last=False)
                        self._opening.pop(gone, None)
                        self._unmap_locked(mm_old)
                    if old is not None:
                        self._unmap_locked(old[0])
        return m

    def _opening_lock(self, i: int) -> threading.RLock:
        """The lock held while shard ``i`` is opened in this process: opening a Parquet row group
        decodes it, and the reader asking for a shard its fetching thread was already opening
        decoded it a second time (10 decodes for 8 row groups in a cold epoch). A shard's lock goes
        when its mapping does, so there are no more of them than mapped shards."""
        with self._hlock:
            return self._opening.setdefault(i, threading.RLock())

    def _read(self, i: int, fn):
        """``fn(mapped shard, header)`` for shard ``i``; the mapping stays open while ``fn`` reads
        it (a drop meanwhile closes it after). Reads are counted rather than done under
        ``_hlock``: a fill of a whole window's batches holding it kept the download threads, which
        map what they fetched, from starting their next downloads."""
        for _attempt in range(5):
            m = self._mapping(i)
            with self._hlock:
                if self._maps_for_pid().get(i) is m:  # not closed by an eviction meanwhile
                    self._reads[id(m[0])] += 1
                    break
        else:
            raise StorageError(f"{self.shards[i].url}: evicted from the cache faster than it can be read; "
                               "raise cache_bytes")
        try:
            return fn(m[0], m[1])
        finally:
            with self._hlock:
                key = id(m[0])
                self._reads[key] -= 1
                if not self._reads[key]:
                    del self._reads[key]
                    if key in self._unmap:
                        _close(self._unmap.pop(key))

    def state(self, i: int) -> Any:
        """What the source parsed from shard ``i`` (trainkit: its header)."""
        return self._read(i, lambda _buf, st: st)

    def _still_there(self, m) -> bool:
        if self.cache_dir is None:
            return True  # file:// shards are read in place, never evicted
        try:
            return os.stat(m[2]).st_ino == m[3]
        except FileNotFoundError:
            return False

    def _groups(self, sample_ids) -> tuple[int, list[tuple[int, np.ndarray | None, np.ndarray]]]:
        """(batch size, [(shard, rows of the batch or None for all, local indices)])."""
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"sample ids outside [0, {len(self)})")
        shard = np.searchsorted(self._starts, ids, side="right") - 1
        uniq = np.unique(shard)
        if len(uniq) == 1:
            i = int(uniq[0])
            return len(ids), [(i, None, ids - self._starts[i])]
        groups = []
        for i in uniq:
            rows = np.nonzero(shard == i)[0]
            groups.append((int(i), rows, ids[rows] - self._starts[i]))
        return len(ids), groups

    def __getitem__(self, sample_id: int) -> dict[str, Any]:
        i, j = self.shard_of(int(sample_id))
        return self._read(i, lambda buf, st: self.source.sample(buf, st, j))

    def get_many(self, sample_ids: Sequence[int]) -> list[dict[str, Any]]:
        """Samples for ``sample_ids`` (in that order), opening each shard once."""
        size, groups = self._groups(sample_ids)
        self._batch_shards = len(groups)
        out: list[Any] = [None] * size
        for i, rows, local in groups:
            got = self._read(i, lambda buf, st: [self.source.sample(buf, st, int(j)) for j in local])
            for k, s in zip(range(size) if rows is None else rows, got):
                out[k] = s
        return out

    def read_batch(self, sample_ids: Sequence[int], *, pin: bool = False, shared: bool = False) -> dict[str, Any]:
        """``default_collate(self.get_many(sample_ids))``, built without decoding sample by sample
        (see :mod:`trainkit.data.batch`): ``pin`` allocates it in page-locked memory, ``shared``
        in shared memory (a DataLoader worker's batch then reaches the main process uncopied)."""
        size, groups = self._groups(sample_ids)
        self._batch_shards = len(groups)
        builder = self.source.batch([self.state(i) for i, _, _ in groups], size, pin=pin, shared=shared)
        self._fill(builder, groups)
        return builder.finish()

    def read_batches(self, id_lists: Sequence[Sequence[int]], *, pin: bool = False,
                     shared: bool = False) -> list[dict[str, Any]]:
        """``[read_batch(ids) for ids in id_lists]``, built as one batch (a gather per shard and
        field for all of them, then views per batch) and shard by shard as the shards arrive:
        the first to complete is read first, so the batches of a window whose shards are still
        downloading are filled during the downloads, not all after the last one (the first
        batch of a shuffled window needs all its shards). The layout comes from the first shard
        read; if a later one does not fit it (a field fixed-shape in one shard, not in another),
        the batches are built again once all their shards are here. Formats whose batches take
        no parts are read batch by batch."""
        parts = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in id_lists]
        size, groups = self._groups(np.concatenate(parts))
        self._batch_shards = len(groups)
        where = {i: (rows, local) for i, rows, local in groups}
        todo = [i for i, _, _ in groups]
        builder: Any = None
        while todo:
            i = self.cache.first_ready(todo)
            todo.remove(i)
            st = self.state(i)
            if builder is None:
                builder = self.source.batch([st], size, pin=pin, shared=shared)
                if not (hasattr(builder, "accepts") and hasattr(builder, "finish_split")):
                    return [self.read_batch(ids, pin=pin, shared=shared) for ids in parts]
            elif not builder.accepts(st):
                # the layout of all their shards: each is waited for
                builder = self.source.batch([self.state(j) for j, _, _ in groups], size, pin=pin, shared=shared)
                self._fill(builder, groups)
                break
            self._fill(builder, [(i, *where[i])])
        return builder.finish_split(np.cumsum([0, *map(len, parts)]).tolist())

    def _fill(self, builder: Any, groups: Sequence[tuple[int, np.ndarray, np.ndarray]]) -> None:
        for i, rows, local in groups:
            self._read(i, lambda buf, st, rows=rows, local=local: builder.fill(buf, st, rows, local))

    def close(self) -> None:
        self.cache.close()
        for i in list(self._maps_for_pid()):
            self._drop_map(i)

    def __getstate__(self):
        d = self.__dict__.copy()
        d.pop("_hlock")
        d["_sizing"] = None
        d["_maps"], d["_maps_pid"] = OrderedDict(), -1
        d["_opening"], d["_reads"], d["_unmap"] = {}, Counter(), {}
        return d

    def __setstate__(self, d) -> None:
        self.__dict__.update(d)
        self._hlock = threading.Lock()

    def __repr__(self) -> str:
        return f"Stream({self.url!r}, samples={len(self)}, shards={self.num_shards})"


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux


def _close(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a view of it is still alive somewhere: it is unmapped when that goes
        pass
