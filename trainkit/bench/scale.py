"""``python -m trainkit.bench scale``: trainkit's own costs at 2 … 4,096 ranks, a billion
samples and a month of run, on paper.

Planning, metadata, listings and logs that cost nothing at 2 ranks are what break at 4,096.
Every figure here comes from the code the library runs, called in this one process with
fabricated inputs (a rank's index, N ranks' file records, N ranks' DCP plans, a bucket after
1,000 saves, a month of records); nothing is trained and no process group is started, so the
table can be recomputed on a laptop for world sizes no test machine has.

The object store is :class:`CountingStore`, an in-memory fsspec filesystem that counts the
requests an object store would be sent (LIST pages of 1,000 keys, GET, HEAD, PUT, DELETE,
COPY) and the bytes put, with listings made the way s3fs makes them (a glob with a depth
lists each directory it descends into).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import pickle
import random
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.memory import MemoryFileSystem

from trainkit import distributed, rundir
from trainkit.bench import report

WORLDS = [2**k for k in range(1, 13)]
PAGE = 1000  # keys per LIST page: S3 ListObjectsV2 and GCS objects.list both stop at 1,000
GiB = 2**30


# -- the counting object store ------------------------------------------------------------

class CountingStore(MemoryFileSystem):
    """``scalecount://``: an in-memory bucket that counts what an object store would be asked.

    ``sizes`` maps a path to the size a listing reports for it, so a file can stand for a
    shard of tens of megabytes while holding a few bytes.
    """

    protocol = "scalecount"
    store: dict[str, Any] = {}
    pseudo_dirs = [""]
    requests: Counter[str] = Counter()
    sizes: dict[str, int] = {}

    @classmethod
    def reset(cls) -> None:
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.requests.clear()
        cls.sizes.clear()

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str):
            path = path.removeprefix(f"{cls.protocol}://")
        return super()._strip_protocol(path)

    def _charge_listing(self, entries: int) -> None:
        self.requests["LIST"] += max(1, math.ceil(entries / PAGE))

    def _sized(self, entry: dict) -> dict:
        size = self.sizes.get(entry["name"])
        return entry if size is None else {**entry, "size": size}

    def ls(self, path, detail=True, **kwargs):
        out = super().ls(path, detail=True, **kwargs)
        self._charge_listing(len(out))
        out = [self._sized(e) for e in out]
        return out if detail else [e["name"] for e in out]

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        found = super().find(path, maxdepth=maxdepth, withdirs=True, detail=True, **kwargs)
        root = self._strip_protocol(path)
        if maxdepth:  # s3fs walks: one delimiter listing per directory above maxdepth
            depth = root.count("/")
            dirs = [root] + [n for n, e in found.items() if e["type"] == "directory"
                             and n != root and n.count("/") - depth < maxdepth]
            for d in dirs:
                self._charge_listing(sum(1 for n in found if n.rsplit("/", 1)[0] == d))
        else:  # one flat listing of the prefix
            self._charge_listing(sum(1 for e in found.values() if e["type"] == "file"))
        out = {n: self._sized(e) for n, e in found.items() if withdirs or e["type"] == "file"}
        return out if detail else sorted(out)

    def info(self, path, **kwargs):
        self.requests["HEAD"] += 1
        return self._sized(super().info(path, **kwargs))

    def cat_file(self, path, start=None, end=None, **kwargs):
        self.requests["GET"] += 1
        return super().cat_file(path, start=start, end=end, **kwargs)

    def get_file(self, rpath, lpath, **kwargs):
        self.requests["GET"] += 1
        with open(lpath, "wb") as f:
            f.write(super().cat_file(rpath))

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        self.requests["PUT"] += 1
        self.requests["bytes_put"] += len(value)
        self.requests["last_put_bytes"] = len(value)
        return super().pipe_file(path, value, mode=mode, **kwargs)

    def put_file(self, lpath, rpath, **kwargs):
        with open(lpath, "rb") as f:
            self.pipe_file(rpath, f.read())

    def cp_file(self, path1, path2, **kwargs):
        self.requests["COPY"] += 1
        return super().cp_file(path1, path2, **kwargs)

    def _rm(self, path):
        self.requests["DELETE"] += 1
        return super()._rm(path)

    def rm(self, path, recursive=False, maxdepth=None):
        if not recursive:
            return self._rm(path)
        names = [n for n in super().find(path, withdirs=False)]
        self._charge_listing(len(names))
        self.requests["DELETE"] += max(1, math.ceil(len(names) / PAGE))  # DeleteObjects: 1,000 keys
        for n in names:
            super()._rm(n)
        self.pseudo_dirs[:] = [d for d in self.pseudo_dirs if not d.startswith(self._strip_protocol(path))]
        return None


fsspec.register_implementation(CountingStore.protocol, CountingStore, clobber=True)


def _store_requests() -> dict[str, int]:
    return {k: v for k, v in CountingStore.requests.items() if not k.endswith("_bytes") and k != "bytes_put"}


@contextlib.contextmanager
def _timed_peak() -> Iterator[dict[str, float]]:
    """Wall time and the tracemalloc peak of the block (allocations from numpy included)."""
    out: dict[str, float] = {}
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - t0
        out["peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def _best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# -- data: order, loader positions, cache ------------------------------------------------

def _order(samples: int, shards: int, window: int):
    from trainkit.data.order import Order

    counts = np.full(shards, samples // shards, dtype=np.int64)
    return Order(counts, window=window, shuffle=True)


def data_epoch_plan(samples: int, shards: int, window: int = 8, seed: int = 0) -> dict[str, float]:
    """Building one epoch's plan (shard permutation, windows, per-shard use ranges): what a
    rank does once per epoch, and again on resume. Independent of the world size."""
    order = _order(samples, shards, window)
    with _timed_peak() as m:
        order.plan(seed, 0)
    return {"s": m["s"], "peak_bytes": m["peak_bytes"]}


def data_step(samples: int, shards: int, world: int, *, micro: int = 4, window: int = 8, seed: int = 0,
              steps: int | None = None) -> dict[str, float]:
    """One rank's per-step work, as the loader and the cache do it: its micro-batch's
    positions (``_MicroBatches.batch_positions``), their sample ids (``Order.positions``) and,
    whenever its position enters a new window, the prefetch schedule ``ShardCache.advance``
    computes (``Order.upcoming``: the window's shards and the next ``2 × window`` in order of
    first use, the Stream's look-ahead at its default prefetch).

    Weak scaling: ``micro`` samples per rank per step, so the global batch is ``micro × world``
    and a step crosses ``micro × world / window samples`` windows. The epoch plans are built
    before timing (see :func:`data_epoch_plan`). Returns seconds per step (mean over
    ``steps``), the share of steps that entered a new window, and the tracemalloc peak of a
    step that did.
    """
    from trainkit.data.loader import _MicroBatches

    order = _order(samples, shards, window)
    rank = world - 1
    mb = _MicroBatches(None, seed=seed, start=order.num_samples // 3, rank=rank, world_size=world, micro=micro,
                       num_workers=0, transform=None, collate=None)
    order.plan(seed, 0)
    order.plan(seed, 1)
    window_samples = window * (samples // shards)
    if steps is None:  # enough steps to cross a few windows, at most a few seconds at world 2
        steps = int(min(20_000, max(50, 3 * window_samples / (micro * world))))
    last_key: Any = None
    schedules = 0

    def step(k: int) -> bool:
        nonlocal last_key, schedules
        lo, hi = mb.batch_positions(k)
        order.positions(seed, lo, hi)
        epoch, idx = divmod(lo, order.num_samples)
        key = (epoch, order.plan(seed, epoch).window_of(idx))
        if key != last_key:
            last_key = key
            order.upcoming(seed, lo, 2 * window)
            schedules += 1
            return True
        return False

    t0 = time.perf_counter()
    for k in range(steps):
        step(k)
    per_step = (time.perf_counter() - t0) / steps
    # the memory of one step that computes a schedule (the costly kind)
    last_key = None
    with _timed_peak() as m:
        step(steps)
    return {"s_per_step": per_step, "steps": steps, "schedule_share": schedules / steps,
            "schedule_step_peak_bytes": m["peak_bytes"], "global_batch": micro * world}


def data_positions(samples: int, shards: int, world: int, *, micro: int = 4, window: int = 8, seed: int = 0,
                   repeats: int = 200) -> float:
    """Seconds for the last rank to compute its micro-batch's sample ids at a step whose
    window is already planned: the part of a step that must not grow with the world size."""
    from trainkit.data.loader import _MicroBatches

    order = _order(samples, shards, window)
    mb = _MicroBatches(None, seed=seed, start=order.num_samples // 3, rank=world - 1, world_size=world,
                       micro=micro, num_workers=0, transform=None, collate=None)
    lo, hi = mb.batch_positions(0)
    order.positions(seed, lo, hi)
    return _best_of(lambda: [order.positions(seed, *mb.batch_positions(0)) for _ in range(repeats)]) / repeats


def data_resume(samples: int, shards: int, world: int, *, micro: int = 4, window: int = 8, seed: int = 0,
                at: int | None = None) -> dict[str, float]:
    """A restarted rank's first batch at an arbitrary global position: ``Loader.load_state_dict``
    keeps only the position, so the work is the plans of that epoch and the next (the cache
    looks ahead), the window's ids, and the first prefetch schedule."""
    from trainkit.data.loader import _MicroBatches

    order = _order(samples, shards, window)
    position = at if at is not None else random.Random(world).randrange(3 * order.num_samples)
    position -= position % (micro * world)
    mb = _MicroBatches(None, seed=seed, start=position, rank=world - 1, world_size=world, micro=micro,
                       num_workers=0, transform=None, collate=None)
    with _timed_peak() as m:
        lo, hi = mb.batch_positions(0)
        order.positions(seed, lo, hi)
        order.upcoming(seed, lo, 2 * window)
    return {"s": m["s"], "peak_bytes": m["peak_bytes"], "position": position}


def data_eviction(samples: int, shards: int, *, cached: int = 16, window: int = 8, seed: int = 0,
                  repeats: int = 5) -> dict[str, float]:
    """``ShardCache._admit`` for a demand fetch into a full cache of ``cached`` shards: the
    eviction decision (next use of each cached shard, victims by furthest next use) and the
    bookkeeping around it, on a real cache directory of sparse files. Per fetch, per node."""
    from trainkit.data.cache import ShardCache, ShardInfo

    order = _order(samples, shards, window)
    shard_bytes = 64 << 20
    sha = "0" * 64
    infos = [ShardInfo(f"shard_{i:07d}.tks", "scalecount://data/x", int(order.counts[i]), shard_bytes, sha)
             for i in range(shards)]
    plan = order.plan(seed, 0)
    position = int(plan.win_starts[len(plan.windows) // 3])
    w = plan.window_of(position)
    present = [int(s) for s in np.concatenate(plan.windows[w: w + 1 + cached // window])][:cached]
    wanted = int(plan.windows[w + 3][0])
    times = []
    with tempfile.TemporaryDirectory(prefix="trainkit-scale-cache-") as d:
        cache = ShardCache(d, infos, cached * shard_bytes, lambda p: order.next_use(seed, p),
                           lambda url: (None, url), threads=1,
                           next_use_of=lambda p, s: order.next_use_of(seed, p, s),
                           upcoming=lambda p, a: order.upcoming(seed, p, a))
        cache._position = position
        for _ in range(repeats):
            for i in present:
                with open(os.path.join(d, infos[i].local_name), "wb") as f:
                    f.truncate(shard_bytes)
            t0 = time.perf_counter()
            tmp = cache._admit(wanted, demand=True)
            times.append(time.perf_counter() - t0)
            os.unlink(tmp)
        cache.close()
    return {"s": min(times), "evictions": int(cache.stats["evictions"]) // repeats}


# -- checkpoint: manifest, collectives, DCP plan and metadata, discovery ---------------------

class SimulatedGroup:
    """Rank 0 of ``world`` ranks for trainkit's object collectives (:mod:`trainkit.distributed`
    and the commit's gather to rank 0): an all-gather or gather returns what ``others(r)``
    fabricates for every rank; a broadcast returns rank 0's object. Counts each collective and
    the pickled bytes rank 0 and any other rank receive through it."""

    def __init__(self, world: int, others: Callable[[int, Any], Any]) -> None:
        self.world, self.others = world, others
        self.calls: Counter[str] = Counter()
        self.bytes_in: Counter[str] = Counter()  # bytes rank 0 receives, per collective kind
        self.bytes_in_other: Counter[str] = Counter()  # bytes any other rank receives

    def _everyones(self, obj) -> tuple[list, int]:
        out = [obj] + [self.others(r, obj) for r in range(1, self.world)]
        return out, sum(len(pickle.dumps(o)) for o in out)

    def all_gather_object(self, obj, group=None) -> list:
        out, n = self._everyones(obj)
        self.calls["all_gather_object"] += 1
        self.bytes_in["all_gather_object"] += n
        self.bytes_in_other["all_gather_object"] += n
        return out

    def gather_object(self, obj, group=None) -> list:
        out, n = self._everyones(obj)
        self.calls["gather_object"] += 1
        self.bytes_in["gather_object"] += n
        self.bytes_in_other["gather_object"] += 0
        return out

    def broadcast_object(self, obj, group=None):
        n = len(pickle.dumps(obj))
        self.calls["broadcast_object"] += 1
        self.bytes_in["broadcast_object"] += n
        self.bytes_in_other["broadcast_object"] += n
        return obj

    def barrier(self, group=None) -> None:
        self.calls["barrier"] += 1

    @contextlib.contextmanager
    def installed(self) -> Iterator[SimulatedGroup]:
        names = [(distributed, n) for n in ("all_gather_object", "gather_object", "broadcast_object", "barrier")]
        saved = [(mod, n, getattr(mod, n)) for mod, n in names]
        try:
            for mod, n in names:
                setattr(mod, n, getattr(self, n))
            yield self
        finally:
            for mod, n, f in saved:
                setattr(mod, n, f)


def _state_bytes(params: float) -> int:
    """fp32 parameters plus Adam's two moments (what FSDP2 with fp32 master weights saves)."""
    return int(params * 12)


def _rank_records(rank: int, world: int, state_bytes: int, io_threads: int = 2) -> dict[str, dict[str, Any]]:
    """What one rank reports to the commit: its DCP data files (``io_threads`` per rank,
    named as DCP's writer names them) and its rank JSON, each with size and CRC-32."""
    per_file = state_bytes // world // io_threads
    recs = {f"__{rank}_{i}.distcp": {"size": per_file, "crc32": f"{(rank * 7919 + i) & 0xFFFFFFFF:08x}"}
            for i in range(io_threads)}
    recs[f"rank_{rank:05d}.json"] = {"size": 4_000 + rank % 97, "crc32": f"{rank * 104729 & 0xFFFFFFFF:08x}"}
    if rank == 0:
        recs[".metadata"] = {"size": 1_000_000, "crc32": "0badf00d"}
    return recs


def checkpoint_commit(world: int, params: float = 8e9) -> dict[str, Any]:
    """One save's commit as rank 0 runs it (``_protocol.commit_collectively``: gather every
    rank's records, ``CheckpointStore.commit``: list, manifest, ``latest``; then retention),
    with ``world`` ranks' records fabricated. Returns the manifest's bytes, the collectives
    and what one rank receives through them, and the store requests."""
    from trainkit.checkpoint._protocol import commit_collectively
    from trainkit.checkpoint._store import CheckpointStore

    CountingStore.reset()
    state = _state_bytes(params)
    store = CheckpointStore("scalecount://run/checkpoints")
    step = 1000
    all_records = {}
    for r in range(world):
        for name, rec in _rank_records(r, world, state).items():
            path = store.file_path(step, name)
            store.fs.pipe_file(path, b"x")
            CountingStore.sizes[path] = rec["size"]
            all_records[name] = rec
    CountingStore.requests.clear()
    group = SimulatedGroup(world, lambda r, own: (_rank_records(r, world, state), None))
    t0 = time.perf_counter()
    with group.installed():
        commit_collectively(store, None, step, _rank_records(0, world, state), None, world_size=world,
                            keep_last=2, keep_every=0, extra={"kind": "dcp"})
    elapsed = time.perf_counter() - t0
    manifest = len(store.fs.cat_file(store.file_path(step, rundir.MANIFEST)))
    return {"manifest_bytes": manifest, "commit_s": elapsed, "collectives": dict(group.calls),
            "bytes_in_rank0": dict(group.bytes_in), "bytes_in_other_rank": dict(group.bytes_in_other),
            "requests": _store_requests()}


# Llama-3-8B (dim 4096, 32 layers, 8 KV heads, FFN 14336, vocab 128256): 291 tensors, 8.03e9 parameters.
def llama3_8b() -> list[tuple[str, tuple[int, ...]]]:
    dim, ffn, kv, vocab = 4096, 14336, 1024, 128256
    shapes = [("tok_embeddings.weight", (vocab, dim))]
    for i in range(32):
        p = f"layers.{i}."
        shapes += [(p + "attention.wq.weight", (dim, dim)), (p + "attention.wk.weight", (kv, dim)),
                   (p + "attention.wv.weight", (kv, dim)), (p + "attention.wo.weight", (dim, dim)),
                   (p + "feed_forward.w1.weight", (ffn, dim)), (p + "feed_forward.w2.weight", (dim, ffn)),
                   (p + "feed_forward.w3.weight", (ffn, dim)), (p + "attention_norm.weight", (dim,)),
                   (p + "ffn_norm.weight", (dim,))]
    return shapes + [("norm.weight", (dim,)), ("output.weight", (vocab, dim))]


def fsdp_local_plans(world: int, model: list[tuple[str, tuple[int, ...]]] | None = None) -> list:
    """Every rank's DCP local save plan for FSDP2 (dim-0 ``Shard(0)``) parameters and AdamW
    state, as ``create_default_local_save_plan`` builds it: one SHARD item per parameter,
    ``exp_avg`` and ``exp_avg_sq`` (offsets and sizes from ``torch.chunk``), and one replicated
    TENSOR item per ``step``; each plan carries the flattening map, as DefaultSavePlanner's does."""
    import torch
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties)
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    model = model or llama3_8b()
    fp32 = TensorProperties(dtype=torch.float32)
    keys: list[tuple[str, tuple[int, ...]]] = []
    for fqn, shape in model:
        keys += [(f"model.{fqn}", shape), (f"optim.state.{fqn}.exp_avg", shape), (f"optim.state.{fqn}.exp_avg_sq", shape)]
    steps = [f"optim.state.{fqn}.step" for fqn, _ in model]
    mappings = {k: tuple(k.split(".", 1)) for k, _ in keys} | {k: tuple(k.split(".", 1)) for k in steps}
    scalar = torch.Size([])
    plans = []
    for r in range(world):
        items = []
        for key, shape in keys:
            rows = shape[0]
            chunk = -(-rows // world)
            lo = min(rows, r * chunk)
            n = max(0, min(rows, lo + chunk) - lo)
            offsets = torch.Size([lo, *([0] * (len(shape) - 1))])
            sizes = torch.Size([n, *shape[1:]])
            items.append(WriteItem(index=MetadataIndex(key, offsets), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets, sizes),
                                                               properties=fp32, size=torch.Size(shape))))
        for key in steps:
            items.append(WriteItem(index=MetadataIndex(key, scalar), type=WriteItemType.TENSOR,
                                   tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(scalar, scalar),
                                                               properties=fp32, size=scalar)))
        plans.append(SavePlan(items, planner_data=mappings))
    return plans


def dcp_global_plan(world: int, *, cached: bool = True) -> dict[str, Any]:
    """DCP's coordinator step of a save, fed ``world`` fabricated FSDP2 local plans:
    ``DefaultSavePlanner.create_global_plan`` (dedup, metadata, validation) and the writer's
    ``prepare_global_plan``; then the ``.metadata`` DCP's writer stores (``finish`` with one
    write result per item). With ``cached``, also the second save with
    ``enable_plan_caching=True`` (every rank sends an empty "unchanged" plan)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
    from torch.distributed.checkpoint.storage import WriteResult

    from trainkit._compat import FsspecWriter, StorageInfo

    plans = fsdp_local_plans(world)
    items = sum(len(p.items) for p in plans)
    plan_bytes = len(pickle.dumps(plans[-1]))
    CountingStore.reset()
    writer = FsspecWriter("scalecount://run/checkpoints/step_000001000", sync_files=False, overwrite=True)
    writer.set_up_storage_writer(True, rank=0, use_collectives=True)
    planner = DefaultSavePlanner()
    gc.collect()
    t0 = time.perf_counter()
    global_plans, metadata = planner.create_global_plan(plans)
    global_plans = writer.prepare_global_plan(global_plans)
    plan_s = time.perf_counter() - t0
    results = [[WriteResult(index=it.index, size_in_bytes=0,
                            storage_data=StorageInfo(f"{gp.storage_data.prefix}0.distcp", 0, 0))
                for it in gp.items] for gp in global_plans]
    t0 = time.perf_counter()
    writer.finish(metadata, results)
    finish_s = time.perf_counter() - t0
    md_bytes = len(CountingStore().cat_file("run/checkpoints/step_000001000/.metadata"))
    out: dict[str, Any] = {"items": items, "local_plan_bytes": plan_bytes, "global_plan_s": plan_s,
                           "finish_s": finish_s, "metadata_bytes": md_bytes,
                           "scatter_plan_bytes": len(pickle.dumps(global_plans[-1]))}
    del results, global_plans, metadata
    if cached:
        caches = ("_cached_save_plan", "_cached_all_plans", "_cached_global_plan", "_cached_metadata",
                  "_cached_final_save_plan")
        try:
            warm = DefaultSavePlanner(enable_plan_caching=True)
            warm.create_global_plan(plans)
            unchanged = [SavePlan([], usable=False) for _ in range(world)]
            again = DefaultSavePlanner(enable_plan_caching=True)
            t0 = time.perf_counter()
            again.create_global_plan(unchanged)
            out["cached_global_plan_s"] = time.perf_counter() - t0
            out["cached_local_plan_bytes"] = len(pickle.dumps(unchanged[0]))
        finally:
            for c in caches:
                getattr(SavePlanner, c).clear()
    return out


def checkpoint_collectives() -> dict[str, Any]:
    """The collectives of one real save and one real load (DCPCheckpointer, one process, a
    small state, on the counting store), counted where they are called: trainkit's object
    collectives in :mod:`trainkit.distributed` and DCP's in its ``_DistWrapper``."""
    import torch
    from torch.distributed.checkpoint.utils import _DistWrapper

    from trainkit.checkpoint import DCPCheckpointer

    CountingStore.reset()
    counts: Counter[str] = Counter()
    wrapped = {}
    for name in ("gather_object", "scatter_object", "broadcast_object", "all_gather_object", "barrier"):
        orig = getattr(_DistWrapper, name)
        wrapped[name] = orig

        def counting(self, *a, _orig=orig, _name=name, **k):
            counts[f"dcp.{_name}"] += 1
            return _orig(self, *a, **k)

        setattr(_DistWrapper, name, counting)
    group = SimulatedGroup(1, lambda r, own: own)
    phases: dict[str, dict[str, int]] = {}
    try:
        with group.installed():
            ck = DCPCheckpointer("scalecount://run/checkpoints", async_save=False, keep_last=2)
            state = {"model": {"w": torch.zeros(64, 64)}, "step": 1}
            ck.save(1, state)
            phases["first save"] = {**counts, **{f"trainkit.{k}": v for k, v in group.calls.items()}}
            counts.clear()
            group.calls.clear()
            ck.save(2, state)
            phases["later save"] = {**counts, **{f"trainkit.{k}": v for k, v in group.calls.items()}}
            counts.clear()
            group.calls.clear()
            ck.load({"model": {"w": torch.empty(64, 64)}, "step": 0})
            phases["load"] = {**counts, **{f"trainkit.{k}": v for k, v in group.calls.items()}}
            ck.close()
    finally:
        for name, orig in wrapped.items():
            setattr(_DistWrapper, name, orig)
    return phases


def _fill_step(store, step: int, world: int) -> None:
    for r in range(world):
        for name in _rank_records(r, world, _state_bytes(8e9)):
            store.fs.pipe_file(store.file_path(step, name), b"x")


def _discover(store) -> tuple[int | None, dict[str, int]]:
    """Restore discovery as rank 0 runs it (``_protocol.load_newest`` with ``manifest_agreed``,
    the manifest and its listing check, as the step's test): (step found, requests)."""
    from trainkit.checkpoint._protocol import load_newest, manifest_agreed

    CountingStore.requests.clear()
    loaded, _ = load_newest(store, None, None, lambda s: manifest_agreed(store, None, s, "dcp")[1])
    return loaded, _store_requests()


def _without_latest(store) -> tuple[int | None, dict[str, int]]:
    """The same with the ``latest`` pointer gone: the fallback, a listing of every manifest."""
    pointer = f"{store.root_path}/{rundir.LATEST}"
    saved = store.fs.cat_file(pointer)
    store.fs.rm_file(pointer)
    try:
        return _discover(store)
    finally:
        store.fs.pipe_file(pointer, saved)


def discovery_history(saves: int = 1000, world: int = 8, keep_last: int = 2, keep_every: int = 0,
                      every: int = 100) -> dict[str, Any]:
    """``saves`` commits with retention through the real ``CheckpointStore`` (files written,
    manifest, ``latest``, ``apply_retention``), then restore discovery: through ``latest``
    (what a restore does) and with the pointer removed (its fallback). Counts the requests
    of each, of the whole history, and of the first and the last save's commit and retention."""
    from trainkit.checkpoint._store import CheckpointStore

    CountingStore.reset()
    store = CheckpointStore("scalecount://run/checkpoints")
    per_save: list[dict[str, int]] = []
    for k in range(1, saves + 1):
        step = k * every
        _fill_step(store, step, world)
        files = {}
        for r in range(world):
            for name, rec in _rank_records(r, world, 0).items():
                files[name] = {"size": 1, "crc32": rec["crc32"], "rank": r}
        before = Counter(_store_requests())
        store.commit(step, files, world_size=world)
        store.apply_retention(keep_last, keep_every)
        per_save.append(dict(Counter(_store_requests()) - before))
    history = _store_requests()
    loaded, through_latest = _discover(store)
    listed, listing = _without_latest(store)
    assert listed == loaded
    return {"saves": saves, "world": world, "retained": len(store.committed_steps()), "loaded": loaded,
            "discovery_requests": through_latest, "listing_requests": listing, "history_requests": history,
            "first_save_requests": per_save[0], "last_save_requests": per_save[-1]}


def discovery_at_world(world: int, retained: int) -> dict[str, Any]:
    """Restore discovery (as :func:`discovery_history`) with ``retained`` committed steps of
    ``world`` ranks' files in the bucket: through ``latest``, and by listing (no pointer)."""
    from trainkit.checkpoint._store import CheckpointStore

    CountingStore.reset()
    store = CheckpointStore("scalecount://run/checkpoints")
    for k in range(1, retained + 1):
        _fill_step(store, k * 100, world)
        files = {name: {"size": 1, "crc32": "0", "rank": r} for r in range(world)
                 for name in _rank_records(r, world, 0)}
        store.commit(k * 100, files, world_size=world)
    _, pointer = _discover(store)
    _, listing = _without_latest(store)
    return {"listing": listing, "latest_pointer": pointer}


# -- run bookkeeping: agreement, logs, report ---------------------------------------------

def metrics_record(step: int, t: float) -> dict[str, Any]:
    """A metrics.jsonl record with every field ``Run._log`` writes for a GPT run."""
    rng = random.Random(step)
    step_s = 1.0 + rng.uniform(-0.05, 0.05)
    return {"step": step, "loss": 2.0 + rng.random(), "lr": 3e-4 * rng.random(), "samples_per_s": 1024 / step_s,
            "step_time_s": step_s, "data_wait_s": 0.002 * rng.random(), "checkpoint_block_s": 0.0,
            "compute_s": step_s - 0.002, "mem_peak_bytes": 71_234_567_890, "time": t, "attempt": 3,
            "samples_seen": step * 1024, "tokens_per_s": 1024 * 8192 / step_s, "mfu": 0.41 + 0.01 * rng.random(),
            "grad_norm": 0.8 + rng.random()}


def log_uploads(records: int, *, part_bytes: int | None = None) -> dict[str, Any]:
    """``records`` writes through the real ``JsonlLog`` into a remote run_dir on the counting
    store, each one uploaded (``flush_seconds=0``: what happens when writes are at least 5 s
    apart, as with one record per 10 steps). ``part_bytes`` as in ``JsonlLog`` (None: its
    default). Returns the PUTs, the bytes put, the last upload's size and the log's size."""
    from trainkit.metrics.jsonl import PART_BYTES, JsonlLog

    CountingStore.reset()
    log = JsonlLog("scalecount://run", rundir.METRICS, flush_seconds=0.0,
                   part_bytes=PART_BYTES if part_bytes is None else part_bytes)
    t0 = time.perf_counter()
    for s in range(1, records + 1):
        log.write(metrics_record(10 * s, 1.7e9 + 10 * s))
    elapsed = time.perf_counter() - t0
    req = dict(CountingStore.requests)
    log.close()
    size = len(rundir.read_log("scalecount://run/" + rundir.METRICS) or b"")
    return {"records": records, "log_bytes": size, "bytes_per_record": size / records, "puts": req["PUT"],
            "bytes_put": req["bytes_put"], "last_put_bytes": req["last_put_bytes"], "write_s": elapsed}


def month_of_records(days: float, *, step_s: float = 1.0, log_every: int = 10, mtbi_h: float = 4.0,
                     checkpoint_every: int = 500, seed: int = 0) -> tuple[list, list]:
    """``days`` of a run's metrics and events records, written by ``simulate_run`` (the
    bookkeeping ``Run`` does) with an interruption every ``mtbi_h`` hours on average."""
    from trainkit.report.simulate import simulate_run

    steps = int(days * 86400 / step_s)
    rng = random.Random(seed)
    n = int(days * 24 / mtbi_h)
    cuts = sorted({rng.randrange(checkpoint_every, steps - 1) for _ in range(n)})
    kinds = [(s, "preempt" if rng.random() < 0.8 else "crash") for s in cuts]
    CountingStore.reset()
    simulate_run("scalecount://month", max_steps=steps, log_every=log_every, checkpoint_every=checkpoint_every,
                 interruptions=kinds, compute_s=step_s * 0.98, data_wait_s=step_s * 0.02, jitter=0.05, seed=seed)
    fs = CountingStore()
    metrics = rundir.parse_jsonl(fs.cat_file("month/metrics.jsonl").decode())
    events = rundir.parse_jsonl(fs.cat_file("month/events.jsonl").decode())
    CountingStore.reset()
    return metrics, events


def report_time(days: float, **kw: Any) -> dict[str, Any]:
    """``report.goodput.goodput`` over ``days`` of records (what ``python -m trainkit.report``
    computes first)."""
    from trainkit.report.goodput import goodput

    metrics, events = month_of_records(days, **kw)
    t0 = time.perf_counter()
    g = goodput(metrics, events)
    return {"days": days, "metrics": len(metrics), "events": len(events), "attempts": g["attempts"],
            "goodput_s": time.perf_counter() - t0}


# -- goodput of a 1,024-node spot week -----------------------------------------------------

# Llama 3 (Dubey et al. 2024, §3.3.4): 419 unexpected interruptions in 54 days on 16,384 GPUs
# (2,048 nodes of 8), no notice.
LLAMA3_FAILURE_PER_NODE_H = 419 / (54 * 24 * 2048)
# SkyPilot's spot traces (github.com/skypilot-org/spot-traces, "Can't Be Late", NSDI '24):
# AWS p3.2xlarge (V100) preemptions per node-hour of running, 7 traces (1-week 1-node traces of
# 2023-04-22 in 4 zones, 2-week 4-node traces of 2023-08-03 in 3 zones); lowest and median.
SKYPILOT_SPOT_PER_NODE_H = {"low (us-east-2a)": 0.060, "median": 0.439}
# docs/benchmarks/checkpoint-2026-11-22.md, s3 on moto, per GB of state on one node.
SAVE_BLOCK_S_PER_GB, SAVE_TOTAL_S_PER_GB, LOAD_S_PER_GB, PROCESS_RESTART_S = 0.045, 19.5, 5.75, 8.6
# torchft on 2 CPU replicas (STACK-NOTES): a survivor resumes after the lighthouse's heartbeat timeout.
TORCHFT_HEAL_S = 5.0


def goodput_table(nodes: int = 1024, days: float = 7, params: float = 70e9, replacement_s: float = 300.0,
                  od_node_h: float = 32.0, spot_discount: float = 0.7, step_s: float = 2.0,
                  every_steps: int = 50, replica_groups: int = 128) -> tuple[list[list[Any]], dict[str, Any]]:
    """Expected goodput and $ (mean of 5 simulations) of ``nodes`` for ``days`` in restart
    mode, per failure source and checkpoint interval (Young–Daly on the blocking cost; the
    recipes' ``every_steps``), and a projection of a replica mode (torchft-like) that trainkit
    does not have: a loss stalls everyone ``TORCHFT_HEAL_S`` and costs its group's share."""
    from trainkit.report.spot_model import Scenario, expected, job_mtbf_s, with_interval, young_daly

    gb = _state_bytes(params) / nodes / 1e9
    base = dict(nodes=nodes, hours=days * 24, save_block_s=SAVE_BLOCK_S_PER_GB * gb,
                save_total_s=SAVE_TOTAL_S_PER_GB * gb, emergency_save_s=SAVE_TOTAL_S_PER_GB * gb,
                restart_s=replacement_s + PROCESS_RESTART_S + LOAD_S_PER_GB * gb)
    cases = [("on-demand, Llama 3 failures", Scenario(**base, failure_per_node_h=LLAMA3_FAILURE_PER_NODE_H,
                                                       node_h_price=od_node_h))]
    for name, rate in SKYPILOT_SPOT_PER_NODE_H.items():
        cases.append((f"spot, SkyPilot {name} + Llama 3 failures",
                      Scenario(**base, notice_per_node_h=rate, failure_per_node_h=LLAMA3_FAILURE_PER_NODE_H,
                               node_h_price=od_node_h * (1 - spot_discount))))
    rows, raw = [], {"state_gb_per_node": gb, "scenario": base}
    for name, sc in cases:
        yd = young_daly(sc.save_block_s, job_mtbf_s(sc))
        for policy, interval in (("Young–Daly", yd), (f"every {every_steps} steps", every_steps * step_s)):
            e = expected(with_interval(sc, interval))
            raw[f"{name} / {policy}"] = {"interval_s": interval, **e}
            rows.append([name, "restart", f"{policy} ({interval:,.0f} s)", f"{100 * e['goodput']:.2f} %",
                         f"{e['notices'] + e['failures']:,.0f}", f"{e['cost'] / 1e6:,.2f}",
                         f"{e['cost_per_useful_node_h']:,.0f}" if math.isfinite(e['cost_per_useful_node_h']) else "∞"])
        rate_s = sc.nodes * (sc.notice_per_node_h + sc.failure_per_node_h) / 3600
        loss = min(1.0, rate_s * (TORCHFT_HEAL_S + sc.restart_s / replica_groups))
        useful = (1 - loss) * sc.nodes * sc.hours
        cost = sc.nodes * sc.node_h_price * sc.hours
        raw[f"{name} / replica projection"] = {"goodput": 1 - loss}
        rows.append([name, f"replica ({replica_groups} groups; projection, not in trainkit)", "no periodic save",
                     f"{100 * (1 - loss):.1f} %", "", f"{cost / 1e6:,.2f}", f"{cost / useful:,.0f}" if useful else "∞"])
    return rows, raw


def goodput_section(raw: dict[str, Any]) -> str:
    rows, g = goodput_table()
    raw["goodput"] = g
    return ("**Goodput of a 1,024-node run for 7 days** (70B parameters: "
            f"{g['state_gb_per_node']:.2f} GB of state per node; restart = "
            f"{g['scenario']['restart_s']:.0f} s; mean of 5 simulations, `trainkit.report.spot_model`)\n\n"
            + report.table(["nodes and failures", "mode", "checkpoint interval", "goodput", "losses",
                            "$M for the week", "$ per useful node-hour"], rows, align="lllrrrr"))


# -- the bench ---------------------------------------------------------------------------

def _fit_linear(xs: list[float], ys: list[float]) -> tuple[float, float]:
    a, b = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m trainkit.bench scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--max-world", type=int, default=4096)
    p.add_argument("--dcp-max-world", type=int, default=128,
                   help="largest world whose DCP plans are built for real (1,164 items per rank); "
                        "beyond it the figures are extrapolated linearly and marked")
    p.add_argument("--samples", type=float, default=1e9)
    p.add_argument("--days", type=float, default=30.0, help="run length for the log and report figures")
    p.add_argument("--report-days", type=float, nargs="+", default=[1, 3, 10, 30])
    p.add_argument("--out", default=None, help="append a markdown section to this file")
    args = p.parse_args(argv)
    worlds = [w for w in WORLDS if w <= args.max_world]
    info = report.machine(("torch", "numpy", "fsspec"))
    t_start = time.perf_counter()
    raw: dict[str, Any] = {"worlds": worlds}
    body: list[str] = []
    samples = int(args.samples)

    # data
    data_rows = []
    raw["data"] = {}
    for shards in (100_000, 1_000_000):
        plan = data_epoch_plan(samples, shards)
        evict = data_eviction(samples, shards)
        per = {}
        for w in worlds:
            per[w] = {"positions_s": data_positions(samples, shards, w), **data_step(samples, shards, w),
                      "resume": data_resume(samples, shards, w)}
            r = per[w]
            data_rows.append([f"{shards:,}", w, f"{r['positions_s'] * 1e6:.1f}", f"{r['s_per_step'] * 1e3:.3f}",
                              f"{r['schedule_share']:.3f}", f"{r['schedule_step_peak_bytes'] / 2**20:.1f}",
                              f"{r['resume']['s']:.3f}", f"{r['resume']['peak_bytes'] / 2**20:.0f}"])
        raw["data"][shards] = {"epoch_plan": plan, "eviction": evict, "per_world": per}
        print(f"data {shards} shards: plan {plan['s']:.3f}s {plan['peak_bytes'] / 2**20:.0f} MiB, "
              f"eviction {evict['s'] * 1e3:.1f} ms", flush=True)
    body.append("**Data** (10⁹ samples; the last rank; 4 samples per rank per step, so the global batch is "
                "4 × world)\n\n" + report.table(
                    ["shards", "world", "ids of its micro-batch (µs)", "step: ids + schedule (ms, mean)",
                     "steps that recompute the schedule", "that step's peak (MiB)", "resume at any position (s)",
                     "resume peak (MiB)"], data_rows))
    body.append(report.table(["shards", "epoch plan (s)", "epoch plan peak (MiB)", "eviction decision per fetch (ms)"],
                             [[f"{s:,}", f"{d['epoch_plan']['s']:.3f}", f"{d['epoch_plan']['peak_bytes'] / 2**20:.0f}",
                               f"{d['eviction']['s'] * 1e3:.2f}"] for s, d in raw["data"].items()]))

    # checkpoint
    ck_rows = []
    raw["checkpoint"] = {"commit": {}, "dcp": {}, "discovery": {}}
    for w in worlds:
        c = checkpoint_commit(w)
        raw["checkpoint"]["commit"][w] = c
    dcp_worlds = [w for w in worlds if w <= args.dcp_max_world]
    for w in dcp_worlds:
        raw["checkpoint"]["dcp"][w] = dcp_global_plan(w)
        d = raw["checkpoint"]["dcp"][w]
        print(f"dcp world {w}: plan {d['global_plan_s']:.2f}s metadata {d['metadata_bytes'] / 2**20:.1f} MiB", flush=True)
    fits = {k: _fit_linear(dcp_worlds[-3:], [raw["checkpoint"]["dcp"][w][k] for w in dcp_worlds[-3:]])
            for k in ("global_plan_s", "metadata_bytes", "cached_global_plan_s", "scatter_plan_bytes", "finish_s")}
    raw["checkpoint"]["dcp_linear_fit"] = fits
    hist = discovery_history()
    raw["checkpoint"]["discovery_history"] = hist
    for w in worlds:
        raw["checkpoint"]["discovery"][w] = discovery_at_world(w, hist["retained"])
    for w in worlds:
        c = raw["checkpoint"]["commit"][w]
        d = raw["checkpoint"]["dcp"].get(w)
        est = d is None

        def dcp(key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
            if d is not None:
                return fmt.format(d[key] * scale)
            a, b = fits[key]
            return fmt.format((a * w + b) * scale) + "*"

        disc = raw["checkpoint"]["discovery"][w]
        ck_rows.append([w, f"{c['manifest_bytes'] / 1e3:,.0f}", f"{sum(c['bytes_in_rank0'].values()) / 1e3:,.0f}",
                        f"{sum(c['bytes_in_other_rank'].values()):,.0f}",
                        dcp("metadata_bytes", 1e-6, "{:,.1f}"), dcp("global_plan_s"), dcp("cached_global_plan_s", 1e3, "{:.2f}"),
                        dcp("scatter_plan_bytes", 1e-3, "{:,.1f}"),
                        sum(disc["listing"].values()), sum(disc["latest_pointer"].values())])
        if est:
            raw["checkpoint"]["dcp"].setdefault("extrapolated", []).append(w)
    body.append("**Checkpoint** (Llama-3-8B under FSDP2 with AdamW: 291 tensors, 96 GB of fp32 state, "
                "1,164 DCP items per rank; * = extrapolated linearly from the largest three worlds built)\n\n"
                + report.table(["world", "manifest (kB)", "commit: rank 0 receives (kB)", "another rank receives (B)",
                                "DCP .metadata (MB)",
                                "global save plan (s)", "same, plan cached (ms)", "plan scattered to a rank (kB)",
                                f"discovery requests ({hist['retained']} retained steps)",
                                "via `latest`"], ck_rows))
    coll = checkpoint_collectives()
    raw["checkpoint"]["collectives"] = coll
    body.append("**Collectives of one save and one load** (counted where called; each object collective is "
                "two c10d collectives: sizes, then payload)\n\n" + report.table(
                    ["phase", "collectives"], [[k, ", ".join(f"{n}×{c}" for n, c in sorted(v.items()))]
                                               for k, v in coll.items()], align="ll"))
    body.append(f"**Restore discovery after {hist['saves']} saves** (world {hist['world']}, keep_last=2): "
                f"{hist['retained']} steps retained, discovery requests {hist['discovery_requests']}")

    # bookkeeping
    raw["bookkeeping"] = {}
    from trainkit.metrics.jsonl import PART_BYTES

    whole = [log_uploads(n, part_bytes=1 << 62) for n in (1000, 4000)]
    rolled = [log_uploads(n) for n in (1000, 4000)]
    raw["bookkeeping"]["uploads_whole_file"] = whole
    raw["bookkeeping"]["uploads_rolled"] = rolled
    bpr = rolled[-1]["bytes_per_record"]
    n_month = int(args.days * 86400 / 10)  # one record per 10 steps of 1 s
    month_bytes = n_month * bpr
    before = bpr * n_month * (n_month + 1) / 2
    per_part = max(1, int(PART_BYTES // bpr))
    after = bpr * per_part * (per_part + 1) / 2 * (n_month // per_part) + bpr * (n_month % per_part) ** 2 / 2
    raw["bookkeeping"]["month"] = {"records": n_month, "metrics_bytes": month_bytes, "uploaded_before": before,
                                   "uploaded_after": after, "parts": n_month // per_part}
    rep = [report_time(d) for d in args.report_days]
    raw["bookkeeping"]["report"] = rep
    body.append("**Run bookkeeping** (a month: one metrics record per 10 steps of 1 s; every record "
                "is uploaded, since writes are ≥ 5 s apart)\n\n" + report.table(
        ["what", "before", "after"],
        [["agreement per step", "1 all_reduce (MAX) of 2 × int32 = 8 bytes", "same"],
         ["metrics.jsonl bytes per record", f"{bpr:.0f}", f"{bpr:.0f}"],
         [f"upload of record {whole[-1]['records']:,} (measured)", f"{whole[-1]['last_put_bytes'] / 1e3:,.0f} kB",
          f"{rolled[-1]['last_put_bytes'] / 1e3:,.0f} kB"],
         [f"bytes put for {whole[-1]['records']:,} records (measured)", f"{whole[-1]['bytes_put'] / 1e6:,.0f} MB",
          f"{rolled[-1]['bytes_put'] / 1e6:,.0f} MB"],
         [f"metrics log after {args.days:g} days", f"{month_bytes / 1e6:,.0f} MB in 1 object",
          f"{n_month // per_part:,} parts of {PART_BYTES / 2**20:g} MiB + tail"],
         ["last upload of the month", f"{month_bytes / 1e6:,.0f} MB", f"≤ {PART_BYTES / 1e6:.1f} MB"],
         ["bytes put over the month", f"{before / 1e12:,.1f} TB", f"{after / 1e12:,.2f} TB"],
         *[[f"report goodput() over {r['days']:g} days ({r['metrics']:,} records, {r['attempts']} attempts)",
            f"{r['goodput_s']:.2f} s", "(not changed)"] for r in rep]], align="lrr"))
    body.append(goodput_section(raw))
    wall = time.perf_counter() - t_start
    text = report.section("python -m trainkit.bench scale", info, body, raw, packages=("torch", "numpy", "fsspec"),
                          wall_s=wall, load_end=report.load_avg(), commit_end=report.git_commit())
    print(text)
    if args.out:
        report.append(args.out, text, "Scale on paper")


main = run
