"""``Loader``: this rank's micro-batches from a :class:`Stream`, exactly resumable.

Positions are GLOBAL: ``p`` counts samples consumed by all ranks together since the start
of training; sample at ``p`` is ``order(seed, p // N)[p % N]``. With
``micro = batch_size // (world_size * grad_accum)``, this rank's ``k``-th micro-batch
covers positions ``start + (k * world_size + rank) * micro + [0, micro)``; i.e. micro-step
``m`` of an optimizer step beginning at ``P`` reads ``P + (m * world_size + rank) * micro``.

With ``num_workers > 0``, DataLoader worker ``w`` produces micro-batches ``k`` with
``k % num_workers == w``; the DataLoader's in-order round robin hands them back in ``k``
order, and the main process counts what it yielded, so ``state_dict()`` is exact whatever
the workers had prefetched. Resuming with other ``world_size`` / ``num_workers`` is exact
as long as the state was taken at an optimizer-step boundary (all ranks then agree on it).

With a CUDA ``device``, batches are pinned as they are collated (the DataLoader's pin thread
with workers) and copied to the device one ahead on a side stream
(:mod:`trainkit.data.prefetch`); the position still counts what was handed out, not what was
copied ahead. On any other device nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainkit.data.batch import default_collate
from trainkit.data.handover import Ring, slot_bytes_for
from trainkit.data.prefetch import pin, to_device
from trainkit.data.stream import Stream
from trainkit.errors import ConfigError

STATE_VERSION = 1
READ_AHEAD_BYTES = 32 << 20  # batches of a window built together while its shards download


def _identity(x):
    return x


class _MicroBatches(IterableDataset):
    """Yields this rank's micro-batches k = first, first + step, ... (forever)."""

    def __init__(self, stream: Stream, *, seed: int, start: int, rank: int, world_size: int, micro: int,
                 num_workers: int, transform, collate, pin: bool = False, read_ahead: int = 1) -> None:
        super().__init__()
        self.stream, self.seed, self.start = stream, seed, start
        self.rank, self.world_size, self.micro = rank, world_size, micro
        self.num_workers = max(1, num_workers)
        self.transform, self.collate = transform, collate
        self.pin = pin
        self.read_ahead = max(1, read_ahead)  # micro-batches read together while their shards arrive
        self.ring: Ring | None = None  # set before the workers start: their hand-over (workers only)

    @property
    def lag(self) -> int:
        """How far other readers of this node may be behind one of them: a round of micro-batches
        of every worker of every rank, twice for slack (for eviction decisions only)."""
        return 2 * self.num_workers * self.world_size * self.micro

    def batch_positions(self, k: int) -> tuple[int, int]:
        lo = self.start + (k * self.world_size + self.rank) * self.micro
        return lo, lo + self.micro

    def _ahead(self, k: int, ids) -> list:
        """The sample ids of micro-batch ``k`` (``ids``) and of this reader's next ones in the
        same shuffle window, ``read_ahead`` at most."""
        out = [ids]
        window = self.stream.window_key(self.batch_positions(k)[0])
        while len(out) < self.read_ahead:
            k += self.num_workers
            lo, hi = self.batch_positions(k)
            if self.stream.window_key(lo) != window:
                break
            out.append(self.stream.ids_at(self.seed, lo, hi))
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w = info.id if info is not None else 0
        if info is not None:
            self.stream.follow()
        ring = self.ring if info is not None else None
        lag = self.lag
        # the default collate of untransformed samples is what read_batch builds directly
        batched = self.transform is None and self.collate is default_collate
        shared = info is not None and ring is None
        built: list[dict[str, Any]] = []  # this reader's next micro-batches, read ahead
        k = w
        while True:
            lo, hi = self.batch_positions(k)
            self.stream.advance(self.seed, lo, lag)
            ids = self.stream.ids_at(self.seed, lo, hi)
            if batched and not built:
                # this reader's next micro-batches of the window at once: one gather per shard and
                # field for all of them; shards still to come are read as they arrive
                built = self.stream.read_batches(self._ahead(k, ids), pin=self.pin, shared=shared)
            if built:
                batch = built.pop(0)
            else:
                samples = self.stream.get_many(ids)
                if self.transform is not None:
                    samples = [self.transform(s) for s in samples]
                batch = self.collate(samples)
            if ring is None:
                yield batch
            else:
                batch = ring.put(k, batch)
                if batch is None:  # the main process stopped taking batches
                    return
                yield k, batch
            k += self.num_workers


def _stored_bytes_per_sample(stream: Stream) -> float:
    files = {s.local_name: s.bytes for s in stream.shards}  # row groups of one file share its bytes
    return sum(files.values()) / max(1, len(stream))


class Loader:
    """This rank's infinite iterator of micro-batches over ``stream``; see the module doc.

    ``batch_size`` is GLOBAL (samples per optimizer step, all ranks and micro-steps).
    """

    def __init__(
        self,
        stream: Stream,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        grad_accum: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        transform: Callable[[dict], dict] | None = None,
        collate: Callable[[list[dict]], Any] = default_collate,
        prefetch_factor: int = 2,
        device: torch.device | str | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        if grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {grad_accum}")
        if batch_size < 1 or batch_size % (world_size * grad_accum):
            raise ConfigError(
                f"batch_size={batch_size} (global) must be a positive multiple of "
                f"world_size*grad_accum={world_size * grad_accum}"
            )
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        if len(stream) == 0:
            raise ConfigError(f"{stream.url}: the dataset has no samples")
        self.stream = stream
        self.batch_size, self.rank, self.world_size, self.grad_accum = batch_size, rank, world_size, grad_accum
        self.micro_batch_size = batch_size // (world_size * grad_accum)
        self.seed = int(seed)
        self.num_workers = num_workers
        self.transform, self.collate = transform, collate
        self.prefetch_factor = prefetch_factor
        self.device = None if device is None else torch.device(device)
        self._start = 0  # global position where the current iterator began
        self._yielded = 0  # micro-batches the current iterator has handed out
        self._generation = 0  # bumped by __iter__/load_state_dict: older iterators stop

    # -- position ------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Global samples consumed (all ranks) once every rank is where this one is."""
        return self._start + self._yielded * self.world_size * self.micro_batch_size

    @property
    def epoch(self) -> int:
        return self.position // len(self.stream)

    @property
    def steps_per_epoch(self) -> float:
        return len(self.stream) / self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "position": int(self.position), "seed": self.seed,
                "num_samples": len(self.stream)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            position, seed = int(state["position"]), int(state["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad data loader state {state!r}: {exc}") from exc
        n = state.get("num_samples")
        if n is not None and int(n) != len(self.stream):
            raise ConfigError(
                f"the data loader state was saved for a dataset of {n} samples, but {self.stream.url} has "
                f"{len(self.stream)}: resuming would not be exact"
            )
        if position < 0:
            raise ConfigError(f"bad data loader position {position}")
        self.seed = seed
        self._start, self._yielded = position, 0
        self._generation += 1

    # -- iteration -----------------------------------------------------------------------
    @property
    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def _dataset(self, start: int) -> _MicroBatches:
        return _MicroBatches(self.stream, seed=self.seed, start=start, rank=self.rank, world_size=self.world_size,
                             micro=self.micro_batch_size, num_workers=self.num_workers, transform=self.transform,
                             collate=self.collate, pin=self._cuda and self.num_workers == 0,
                             read_ahead=int(READ_AHEAD_BYTES // max(1.0, self.micro_batch_size
                                                                    * _stored_bytes_per_sample(self.stream))))

    def __iter__(self) -> Iterator[Any]:
        start = self.position
        self._start, self._yielded = start, 0
        self._generation += 1
        ds = self._dataset(start)
        cuda = self._cuda
        if self.num_workers == 0:
            source: Any = iter(ds)
            if cuda:
                source = map(pin, source)
        else:
            # this process fetches ahead for its workers (they only read the cache): the first
            # shards are on their way before the workers start, and no worker builds a store
            # client of its own
            self.stream.advance(self.seed, start, ds.lag)
            ds.ring = Ring(self.num_workers * self.prefetch_factor + 2,
                           slot_bytes_for(_stored_bytes_per_sample(self.stream), self.micro_batch_size))
            source = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                                     prefetch_factor=self.prefetch_factor, persistent_workers=False,
                                     pin_memory=cuda))
            source = self._lead(source, ds, cuda)
        if cuda:
            source = to_device(source, self.device)
        return self._count(source, self._generation)

    def _lead(self, source, ds: _MicroBatches, pin_out: bool) -> Iterator[Any]:
        """The workers' batches out of their ring slots, in order; tells the stream where the
        furthest micro-batch the workers may be reading is."""
        ring = ds.ring
        assert ring is not None
        ahead = self.num_workers * self.prefetch_factor
        try:
            for k, (got, batch) in enumerate(source):
                if got != k:
                    raise RuntimeError(f"DataLoader handed out micro-batch {got} where {k} was due")
                batch = ring.take(k, batch, pin=pin_out)
                self.stream.advance(self.seed, ds.batch_positions(k + ahead)[0], ds.lag)
                yield batch
        finally:
            ring.close()

    def _count(self, source, generation: int) -> Iterator[Any]:
        for batch in source:
            if self._generation != generation:  # load_state_dict or a newer iterator took over
                return
            self._yielded += 1
            yield batch
