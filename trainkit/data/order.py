"""Epoch order: a pure function of (seed, epoch, index), computed window by window.

Per epoch, with a numpy Generator seeded by ``SeedSequence([seed, epoch, tag])``:

1. the shards are permuted;
2. consecutive shards of that permutation are grouped into windows of ``window`` shards;
3. the sample ids of each window are permuted with a Generator seeded by
   ``SeedSequence([seed, epoch, tag, window + 1])``;
4. the epoch order is the concatenation of the windows.

Only the shards of one window are in use at a time, so a small cache suffices and the next
window is known in advance (prefetch, eviction). Nothing depends on the number of ranks or
loader workers: they only choose which *positions* of this order they read.
"""

from __future__ import annotations

from collections import OrderedDict
from threading import Lock

import numpy as np

_TAG = 0x7472_6B64  # "trkd": keeps these streams apart from other uses of the same seed
_MASK = (1 << 64) - 1


def _rng(seed: int, epoch: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & _MASK, epoch, _TAG, *extra]))


class EpochPlan:
    """The order of one epoch: shard permutation, windows, per-window sample permutations."""

    def __init__(self, counts: np.ndarray, starts: np.ndarray, seed: int, epoch: int, window: int,
                 shuffle: bool) -> None:
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        self._counts, self._starts = counts, starts
        n_shards = len(counts)
        self.shard_perm = _rng(seed, epoch).permutation(n_shards) if shuffle else np.arange(n_shards)
        window = max(1, int(window)) if shuffle else 1
        self.window = window
        bounds = np.arange(0, n_shards, window)
        self.windows = [self.shard_perm[i : i + window] for i in bounds]
        # Vectorised: a resume builds two plans, and at 10^6 shards a loop over the windows
        # cost seconds of every restart.
        sizes = (np.add.reduceat(np.asarray(counts, dtype=np.int64)[self.shard_perm], bounds)
                 if n_shards else np.zeros(0, dtype=np.int64))
        self.win_starts = np.zeros(len(self.windows) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.win_starts[1:])
        # for each shard: [start, end) of the window (in-epoch indices) where it is in use
        window_of_slot = np.arange(n_shards) // window
        self.shard_use_start = np.empty(n_shards, dtype=np.int64)
        self.shard_use_end = np.empty(n_shards, dtype=np.int64)
        self.shard_use_start[self.shard_perm] = self.win_starts[window_of_slot]
        self.shard_use_end[self.shard_perm] = self.win_starts[window_of_slot + 1]
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = Lock()

    @property
    def num_samples(self) -> int:
        return int(self.win_starts[-1])

    def window_of(self, index: int) -> int:
        return int(np.searchsorted(self.win_starts, index, side="right")) - 1

    def window_ids(self, w: int) -> np.ndarray:
        with self._lock:
            ids = self._cache.get(w)
            if ids is not None:
                self._cache.move_to_end(w)
                return ids
        shards = self.windows[w]
        ids = np.concatenate([np.arange(self._starts[s], self._starts[s] + self._counts[s], dtype=np.int64)
                              for s in shards])
        if self.shuffle:
            _rng(self.seed, self.epoch, w + 1).shuffle(ids)
        with self._lock:
            self._cache[w] = ids
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        return ids

    def ids(self, lo: int, hi: int) -> np.ndarray:
        """Sample ids at in-epoch indices [lo, hi)."""
        if not 0 <= lo <= hi <= self.num_samples:
            raise IndexError(f"indices [{lo}, {hi}) outside the epoch of {self.num_samples} samples")
        parts = []
        while lo < hi:
            w = self.window_of(lo)
            ws, we = int(self.win_starts[w]), int(self.win_starts[w + 1])
            take = min(hi, we)
            parts.append(self.window_ids(w)[lo - ws : take - ws])
            lo = take
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def order(self) -> np.ndarray:
        return self.ids(0, self.num_samples)


class Order:
    """Plans for (seed, epoch), memoised (a few at a time)."""

    def __init__(self, counts, window: int, shuffle: bool) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.zeros(len(self.counts), dtype=np.int64)
        np.cumsum(self.counts[:-1], out=self.starts[1:])
        self.num_samples = int(self.counts.sum())
        self.window, self.shuffle = window, shuffle
        self._plans: OrderedDict[tuple[int, int], EpochPlan] = OrderedDict()
        self._lock = Lock()

    def __getstate__(self):  # picklable (spawned workers): plans are rebuilt on demand
        d = self.__dict__.copy()
        d["_plans"] = OrderedDict()
        d.pop("_lock")
        return d

    def __setstate__(self, d) -> None:
        self.__dict__.update(d)
        self._lock = Lock()

    def plan(self, seed: int, epoch: int) -> EpochPlan:
        key = (int(seed), int(epoch))
        with self._lock:
            p = self._plans.get(key)
            if p is not None:
                self._plans.move_to_end(key)
                return p
        p = EpochPlan(self.counts, self.starts, key[0], key[1], self.window, self.shuffle)
        with self._lock:
            self._plans[key] = p
            while len(self._plans) > 4:
                self._plans.popitem(last=False)
        return p

    def positions(self, seed: int, lo: int, hi: int) -> np.ndarray:
        """Sample ids at GLOBAL positions [lo, hi) (epochs chained)."""
        n = self.num_samples
        parts = []
        while lo < hi:
            epoch, idx = divmod(lo, n)
            take = min(hi - lo, n - idx)
            parts.append(self.plan(seed, epoch).ids(idx, idx + take))
            lo += take
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def next_use(self, seed: int, position: int) -> np.ndarray:
        """For each shard, the first global position >= ``position`` at which it is in use.

        A shard is "in use" from the start to the end of its window, so a shard of the current
        window gets ``position`` itself. Looks ahead into the next epoch.
        """
        n = self.num_samples
        epoch, idx = divmod(position, n)
        cur = self.plan(seed, epoch)
        nxt = self.plan(seed, epoch + 1)
        this_epoch = epoch * n + np.maximum(cur.shard_use_start, idx)
        next_epoch = (epoch + 1) * n + nxt.shard_use_start
        return np.where(cur.shard_use_end > idx, this_epoch, next_epoch)

    def next_use_of(self, seed: int, position: int, shards: np.ndarray) -> np.ndarray:
        """``next_use(seed, position)[shards]`` in O(len(shards)): what eviction needs, for the
        shards in the cache only."""
        shards = np.asarray(shards, dtype=np.int64)
        n = self.num_samples
        epoch, idx = divmod(position, n)
        cur, nxt = self.plan(seed, epoch), self.plan(seed, epoch + 1)
        this_epoch = epoch * n + np.maximum(cur.shard_use_start[shards], idx)
        next_epoch = (epoch + 1) * n + nxt.shard_use_start[shards]
        return np.where(cur.shard_use_end[shards] > idx, this_epoch, next_epoch)

    def upcoming(self, seed: int, position: int, ahead: int) -> np.ndarray:
        """The shards of the window in use at ``position``, then the next ``ahead`` in order of
        first use (into the next epoch), each once: O(window + ahead), where sorting every
        shard's next use cost O(shards) at every window change."""
        n = self.num_samples
        epoch, idx = divmod(position, n)
        plan = self.plan(seed, epoch)
        w = plan.window_of(idx)
        slot = w * plan.window
        count = len(plan.windows[w]) + ahead
        later = plan.shard_perm[slot : slot + count]
        if len(later) < count:  # into the next epoch; a shard is used once per epoch
            later = np.concatenate([later, self.plan(seed, epoch + 1).shard_perm[:count]])
            _, first = np.unique(later, return_index=True)
            later = later[np.sort(first)][:count]
        return later
