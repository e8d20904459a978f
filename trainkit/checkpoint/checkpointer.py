"""Sharded, asynchronous, crash-safe checkpoints on any fsspec URL (see docs/checkpoints.md)."""

from __future__ import annotations

import itertools
import logging
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from datetime import timedelta
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from trainkit import distributed, storage
from trainkit.checkpoint import _codec
from trainkit.checkpoint._dcp_io import (METADATA_FILE, SAFETENSORS, SafeFsspecReader, TrackedFsspecWriter,
                                         read_metadata, shard_format)
from trainkit.checkpoint._protocol import (agree, commit_collectively, load_newest, manifest_agreed,
                                           rank_state_agreed)
from trainkit.checkpoint._store import CheckpointStore, step_name
from trainkit.checkpoint._tree import (CheckpointMismatch, RankState, rank_json_name, rank_tensors_name, restore,
                                       split_state)
from trainkit.errors import StorageError

log = logging.getLogger("trainkit.checkpoint")

_planner_ids = itertools.count()


def _quiet_dcp() -> None:
    """DCP warns on every single-process save/load, and when a step dir it writes already
    holds an older DCP attempt (trainkit only rewrites uncommitted or de-committed steps).

    torch also sets its DCP and c10d loggers to DEBUG behind a NullHandler, so every DCP
    call and Python collective builds log records that go nowhere: ~370 per save, 5 ms of
    the 30 ms a small model's save blocks training on CPU. They are raised to WARNING while
    nothing but a NullHandler listens (a destination someone configured keeps its records).
    """
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                            category=UserWarning)
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint in", category=UserWarning)
    from trainkit._compat import dcp_debug_loggers

    for unheard in dcp_debug_loggers():
        if (unheard.level <= logging.DEBUG
                and all(isinstance(h, logging.NullHandler) for h in unheard.handlers)):
            unheard.setLevel(logging.WARNING)


def _short(exc: BaseException) -> str:
    if isinstance(exc, CheckpointException):
        parts = [f"rank {r}: {type(e).__name__}: {e}" for r, (e, _tb) in sorted(exc.failures.items())]
        return "; ".join(parts) or "CheckpointException"
    if isinstance(exc, storage.Failures):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _dcp(call: Callable[[], Any]) -> Any:
    """``call()``, a DCP save or load, with its CheckpointException as :class:`storage.Failures`.

    CheckpointException is a BaseException, which :func:`trainkit.storage.retry` rightly
    does not catch; as Failures it is retried when every rank's failure is transient, and
    since every rank sees the same failures, all ranks decide alike.
    """
    try:
        return call()
    except CheckpointException as exc:
        raise storage.Failures(_short(exc), [e for e, _tb in (exc.failures or {}).values()]) from None


def _store_transient(exc: BaseException) -> bool:
    """A save failure worth repeating: the store's transient errors, but not a peer's death,
    whose gloo error reads like one ("Connection reset by peer") and which no retry mends."""
    errors = exc.errors if isinstance(exc, storage.Failures) else [exc]
    return not any(distributed.is_peer_loss(e) for e in errors) and storage.is_transient(exc)


def _cause(exc: StorageError) -> BaseException:
    """What :func:`trainkit.storage.retry` gave up on."""
    return exc.__cause__ if exc.__cause__ is not None else exc


class _KeepStager(DefaultStager):
    """DCP's stager (staging buffers allocated once and reused by every save) that keeps
    what it staged, so a failed upload can be retried from the same copy."""

    def __init__(self, overlap: bool) -> None:
        cuda = torch.cuda.is_available()
        # Non-blocking copies on CUDA also without overlap: queued into the pinned buffers and
        # waited for once per save, not once per tensor.
        super().__init__(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                        use_async_staging=overlap, use_non_blocking_copy=cuda))
        self.staged: Any = None

    def stage(self, state_dict, **kwargs):
        from trainkit._compat import staging_stream

        stream = staging_stream(self)
        if stream is not None:
            # The tensors were last written on the training stream (the optimizer step, maybe
            # still queued): the copy stream starts after it, with no host wait.
            stream.wait_stream(torch.accelerator.current_stream())
        self.staged = super().stage(state_dict, **kwargs)
        return self.staged

    def result(self) -> Any:
        return self.staged.result() if isinstance(self.staged, Future) else self.staged


class DCPCheckpointer:
    """Saves and loads the training-state tree under ``root`` (an fsspec URL), sharded with
    torch.distributed.checkpoint; the :class:`~trainkit.checkpoint.CheckpointerProtocol`
    of the torch-native strategies. ``Checkpointer`` is the same class, by the name the
    docs use.

    Every rank constructs it (in the same order relative to other ``new_group`` calls) and
    calls :meth:`save` / :meth:`load` with the same steps. See docs/checkpoints.md.

    ``overlap_staging``: :meth:`save` returns before the tensors are even copied to host
    memory; the copy runs while the caller computes the next forward and backward, and the
    caller must call :meth:`staged` before it changes any saved tensor (``trainkit.Run``
    does so from an optimizer step pre-hook; :class:`ModelOptimState` snapshots module
    buffers, which change during forward). Off by default for direct use.
    ``io_threads``: files each rank writes (and reads) in parallel. ``save_attempts``: how
    often a whole DCP save (or load) is tried when the store fails transiently.
    """

    def __init__(self, root: str, *, keep_last: int = 2, keep_every: int = 0, async_save: bool = True,
                 process_group=None, verify: str = "checksum", save_attempts: int = 5,
                 collective_timeout: timedelta | None = None, overlap_staging: bool = False,
                 io_threads: int = 2) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1 (the newest committed checkpoint is never deleted)")
        if verify not in ("checksum", "size"):
            raise ValueError("verify must be 'checksum' or 'size'")
        if io_threads < 1:
            raise ValueError("io_threads must be >= 1")
        self.store = CheckpointStore(root)
        self.root = self.store.root
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_save = async_save
        self.overlap_staging = overlap_staging and async_save
        self.io_threads = io_threads
        self.verify = verify
        self.save_attempts = max(1, save_attempts)
        # One gloo group for everything the checkpointer does across ranks: DCP's own
        # collectives (async DCP deadlocks on the training group while it trains) and the
        # commit/load agreement. Created collectively, here, on every rank.
        self._group = distributed.new_gloo_group(process_group, collective_timeout)
        # The world every save is made and committed in: a commit needs all of it, so a save
        # still in flight when the group is torn down (a launcher ending a worker whose peer
        # died) fails instead of committing one rank's part of the checkpoint.
        self._distributed = distributed.initialized()
        self._world = distributed.world(self._group)
        self._executor: ThreadPoolExecutor | None = None
        self._stager: _KeepStager | None = None
        self._pending: Future | None = None
        self._staging: Future | None = None
        # Newest step known to be committed under root (None: not looked yet). A save past
        # it cannot collide with a committed step, so the hot path skips the store lookup.
        self._newest_committed: int | None = None
        self.last_blocking_s: float = 0.0  # how long the last save() blocked the caller
        self.last_save_s: float = 0.0      # start of save() to commit (before retention), last save
        self.commits: list[int] = []  # the steps this checkpointer's own saves committed, in order
        self.last_loaded_step: int | None = None
        # DCP's save plans, cached across saves under this checkpointer's own key (see _planner).
        self._plan_prefix = f"trainkit.DCPCheckpointer/{next(_planner_ids)}"
        self._plan_key: str | None = None
        self._closed = False

    # -- helpers -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return distributed.rank(self._group)

    @property
    def world_size(self) -> int:
        return self._world

    def _writer(self, step: int) -> TrackedFsspecWriter:
        url = self.store.step_url(step)
        return TrackedFsspecWriter(url, storage.storage_options(url), sync_files=self.store.local,
                                   thread_count=self.io_threads)

    def _reader(self, step: int, expected: dict[str, dict[str, Any]] | None, metadata, shards: str
                ) -> SafeFsspecReader:
        url = self.store.step_url(step)
        return SafeFsspecReader(url, storage.storage_options(url), expected=expected, threads=self.io_threads,
                                metadata=metadata, shards=shards)

    def _planner(self, tensors: Mapping[str, Any]):
        """DCP's planner with plan caching: from the second save of the same tree on, each rank
        sends an "unchanged" marker instead of its local plan and the coordinator reuses the
        global plan and metadata (at 4,096 FSDP ranks of an 8B model: minutes of planning on
        rank 0 per save, and ~258 kB per rank, docs/benchmarks/scale-2026-12-01.md). torch
        compares keys, offsets and shapes but not dtypes, and the plan's dtype is what the
        shard headers record, so the cache key carries the dtypes: a tree whose dtypes change
        replans under a new key (every rank alike: they hold the same tree)."""
        from trainkit._compat import caching_save_planner, drop_save_plans

        dtypes = "|".join(f"{k}:{getattr(v, 'dtype', '')}" for k, v in sorted(tensors.items()))
        key = f"{self._plan_prefix}/{zlib.crc32(dtypes.encode()):08x}"
        if key != self._plan_key:
            if self._plan_key is not None:
                drop_save_plans(self._plan_key)
            self._plan_key = key
        return caching_save_planner(key)

    def _already_committed(self, step: int) -> bool:
        """Whether ``step`` is committed; asks the store only when it could be."""
        if self._newest_committed is None:
            newest = self.store.newest_committed() if self.rank == 0 else None
            newest = distributed.broadcast_object(newest, self._group)
            self._newest_committed = -1 if newest is None else newest
        if step > self._newest_committed:
            return False
        exists = self.store.is_committed(step) if self.rank == 0 else None
        return bool(distributed.broadcast_object(exists, self._group))

    # -- save ----------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any], *, blocking: bool = False) -> None:
        """Checkpoints ``state`` as step ``step``. All ranks call it.

        Async by default: returns once the tensors are copied to host memory (or, with
        ``overlap_staging``, once that copy is started); the upload and the commit continue
        in the background (:meth:`wait` to block). A previous save still in flight is waited
        for first. A step that is already committed is not rewritten.
        """
        if self._closed:
            raise RuntimeError("Checkpointer is closed")
        t0 = time.perf_counter()
        _quiet_dcp()
        self.wait()
        step = int(step)
        if distributed.initialized() != self._distributed:
            why = ("its process group is gone" if self._distributed else "torch.distributed was initialized after "
                   "the Checkpointer was made (make it after init_process_group, on every rank)")
            raise StorageError(f"checkpoint step {step} under {self.root} was not committed: {why}")
        if self._already_committed(step):
            log.info("checkpoint step %d already committed under %s; not saving it again", step, self.root)
            self.last_blocking_s = time.perf_counter() - t0
            return
        shared, local = split_state(state)
        json_tree, tensors = _codec.split(shared)
        rank_state = RankState.encode(step, self.rank, self.world_size, json_tree, local)

        writer = self._writer(step)
        if self.async_save:
            if self._stager is None:
                self._stager = _KeepStager(self.overlap_staging)
            resp = dcp.async_save(tensors, storage_writer=writer, planner=self._planner(tensors),
                                  process_group=self._group, async_stager=self._stager,
                                  no_dist=not distributed.initialized())
            if isinstance(resp, AsyncSaveResponse):
                upload, self._staging = resp.upload_completion, resp.staging_completion
            else:
                upload, self._staging = resp, None
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainkit-ckpt")
            self._pending = self._executor.submit(self._finish, step, t0, writer, upload, rank_state)
            self.last_blocking_s = time.perf_counter() - t0
            if blocking:
                self.wait()
        else:
            self._finish(step, t0, writer, None, rank_state, tensors)
            self.last_blocking_s = time.perf_counter() - t0

    def staged(self) -> float:
        """Blocks until the in-flight save has copied the tensors (with ``overlap_staging``;
        otherwise they already are); returns the seconds waited. Errors surface in :meth:`wait`."""
        fut = self._staging
        if fut is None or fut.done():
            return 0.0
        t0 = time.perf_counter()
        futures_wait([fut])
        return time.perf_counter() - t0

    def _finish(self, step, t0, writer, upload: Future | None, rank_state: RankState,
                tensors: dict[str, Any] | None = None) -> None:
        """Runs on every rank (background thread when async): finish the DCP write with
        retries, write the rank files, then agree and commit on rank 0."""
        err: str | None = None
        records: dict[str, dict[str, Any]] = {}
        url = self.store.step_url(step)
        tries = 0

        def write() -> None:
            """The first try waits for the async upload; a retry saves the kept host copy
            again, through a fresh writer (its records start empty)."""
            nonlocal tries, writer
            tries += 1
            if upload is not None and tries == 1:
                _dcp(upload.result)
                return
            if tries > 1:
                writer = self._writer(step)
            sd = self._stager.result() if upload is not None else tensors
            _dcp(lambda: dcp.save(sd, storage_writer=writer, planner=self._planner(sd), process_group=self._group,
                                  no_dist=not distributed.initialized()))

        def retrying(attempt: int, exc: BaseException) -> None:
            log.warning("checkpoint step %d: transient store error (attempt %d/%d), retrying: %s",
                        step, attempt, self.save_attempts, _short(exc)[:300])

        try:
            try:
                storage.retry(write, what=url, attempts=self.save_attempts, base_delay=0.4, on_retry=retrying,
                              transient=_store_transient)
            except StorageError as exc:
                raise StorageError(f"{url}: DCP save failed: {_short(_cause(exc))}") from None
            records.update(writer.records)
            records.update(rank_state.write(self.store, step, self.rank))
        except Exception as exc:  # noqa: BLE001 - reported collectively below
            err = f"rank {self.rank}: {exc}" if isinstance(exc, StorageError) else f"rank {self.rank}: {_short(exc)}"
        def committed() -> None:
            self.last_save_s = time.perf_counter() - t0
            self.commits.append(step)
            self._newest_committed = max(step, -1 if self._newest_committed is None else self._newest_committed)
            log.info("checkpoint step %d committed under %s (%.2fs)", step, self.root, self.last_save_s)

        commit_collectively(self.store, self._group, step, records, err, world_size=self._world,
                            keep_last=self.keep_last, keep_every=self.keep_every,
                            extra={"kind": "dcp", "shards": SAFETENSORS}, on_commit=committed)

    def wait(self) -> None:
        """Blocks until the in-flight save is committed; raises its error if it failed."""
        fut, self._pending = self._pending, None
        self._staging = None
        if fut is not None:
            fut.result()

    @property
    def in_flight(self) -> bool:
        return self._pending is not None and not self._pending.done()

    # -- discovery -----------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps (manifest present), ascending."""
        return self.store.committed_steps()

    @property
    def process_group(self) -> Any:
        return self._group

    def latest_step(self) -> int | None:
        """The newest committed step (manifest present and well-formed), or None."""
        return self.store.valid_latest()

    # -- load ----------------------------------------------------------------------------
    def load(self, state: dict[str, Any], step: int | None = None) -> int | None:
        """Loads ``state`` in place from ``step`` (None: newest committed that verifies).

        A torn or corrupt checkpoint is skipped with a warning (and de-committed) and the
        previous committed one is tried. Returns the step loaded, or None when there is none.
        A checkpoint whose keys or shapes do not fit ``state`` raises CheckpointMismatch.
        All ranks call it.
        """
        _quiet_dcp()
        self.wait()
        loaded, committed = load_newest(self.store, self._group, step, lambda s: self._try_load(s, state))
        self._newest_committed = committed[-1] if committed else -1
        if loaded is not None:
            self.last_loaded_step = loaded
        return loaded

    def _try_load(self, step: int, state: dict[str, Any]) -> str | None:
        g, r = self._group, self.rank
        # 1. the manifest (rank 0) and a listing check
        man, problem = manifest_agreed(self.store, g, step, "dcp")
        if problem:
            return problem
        # 2. the DCP metadata (the shard headers; a raw/1 checkpoint's .metadata, checked and
        #    safely unpickled) and the structure of the state
        shards = shard_format(man, self.store.step_url(step))
        md, problem = None, None
        if r == 0:
            try:
                record = man["files"].get(METADATA_FILE) if self.verify == "checksum" else None
                md, _ = read_metadata(self.store.fs, self.store.step_path(step), man["files"],
                                      what=self.store.step_url(step), shards=shards, metadata_record=record,
                                      threads=self.io_threads)
            except Exception as exc:  # noqa: BLE001
                problem = f"DCP metadata unreadable: {_short(exc)}"
        md, problem = distributed.broadcast_object((md, problem), g)
        if problem:
            return problem
        md_info = {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
        shared, _ = split_state(state)
        _, tensors = _codec.split(shared)
        missing = sorted(k for k in tensors if k not in md_info)
        wrong = sorted(k for k in tensors if k in md_info and tuple(tensors[k].shape) != md_info[k])
        mismatch = None
        if missing or wrong:
            mismatch = (f"checkpoint {self.store.step_url(step)} does not fit the state: "
                        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
                        f"shape mismatch {wrong[:5]}{'...' if len(wrong) > 5 else ''}")
        mismatch = agree(mismatch, g)
        if mismatch:
            raise CheckpointMismatch(mismatch)
        # 3. this rank's JSON (rank r % old world size after a resize)
        rank_doc, local_t, problem = rank_state_agreed(self.store, g, step, man, verify=self.verify == "checksum")
        if problem:
            return problem
        # 4. the tensors, in place, resharded by DCP to the current layout; every data file
        #    read is checked against the manifest in the same pass
        expected = man["files"] if self.verify == "checksum" else None
        try:
            storage.retry(lambda: _dcp(lambda: dcp.load(tensors, storage_reader=self._reader(step, expected, md, shards),
                                                        process_group=g, no_dist=not distributed.initialized())),
                          what=self.store.step_url(step), attempts=self.save_attempts, base_delay=0.4)
        except StorageError as exc:
            # a DCP failure is the same on every rank; anything else: agree
            problem = f"DCP load failed: {_short(_cause(exc))[:2000]}"
        problem = agree(problem, g)
        if problem:
            return problem
        # 5. put the JSON values back around the loaded tensors
        restore(state, rank_doc, step, tensors=tensors, local_tensors=local_t)
        return None

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Waits for the in-flight save (raising its error), then releases the thread and
        the staging buffers."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if self._plan_key is not None:
                from trainkit._compat import drop_save_plans

                drop_save_plans(self._plan_key)
                self._plan_key = None

    def __enter__(self) -> DCPCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r}, keep_last={self.keep_last}, keep_every={self.keep_every})"


Checkpointer = DCPCheckpointer

__all__ = ["Checkpointer", "CheckpointMismatch", "DCPCheckpointer", "rank_json_name", "rank_tensors_name", "step_name"]
