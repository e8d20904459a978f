"""Sharded, asynchronous, crash-safe checkpoints on any fsspec URL (see docs/checkpoints.md)."""

from __future__ import annotations

import logging
import random
import time
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse
from torch.distributed.checkpoint.stateful import Stateful

from trainkit import storage
from trainkit.checkpoint import _codec, _dist
from trainkit.checkpoint._dcp_io import METADATA_FILE, SafeFsspecReader, TrackedFsspecWriter, safe_load_metadata
from trainkit.checkpoint._store import MANIFEST, CheckpointStore, sha256_bytes, step_name
from trainkit.checkpoint.state import RankLocal
from trainkit.errors import StorageError

log = logging.getLogger("trainkit.checkpoint")



def _quiet_dcp() -> None:
    """DCP warns on every single-process save/load, and when a step dir it writes already
    holds an older DCP attempt (trainkit only rewrites uncommitted or de-committed steps)."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                            category=UserWarning)
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint in", category=UserWarning)

RANK_FILE_FORMAT = "trainkit-rank-state/1"


def rank_json_name(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def rank_tensors_name(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, CheckpointException):
        fails = [e for e, _tb in exc.failures.values()] if exc.failures else []
        return bool(fails) and all(_is_transient(e) for e in fails)
    if isinstance(exc, StorageError):
        return exc.__cause__ is not None and storage.is_transient(exc.__cause__)
    return storage.is_transient(exc)


def _short(exc: BaseException) -> str:
    if isinstance(exc, CheckpointException):
        parts = [f"rank {r}: {type(e).__name__}: {e}" for r, (e, _tb) in sorted(exc.failures.items())]
        return "; ".join(parts) or "CheckpointException"
    return f"{type(exc).__name__}: {exc}"


def commit_collectively(store: CheckpointStore, group, step: int, records: dict[str, dict[str, Any]],
                        err: str | None, *, keep_last: int, keep_every: int, extra: dict[str, Any]) -> None:
    """Every rank, after writing its files: gather (files, error) to all, rank 0 writes the
    manifest and moves ``latest`` only when no rank failed, then applies retention; the
    outcome is broadcast so every rank raises the same error or none."""
    gathered = _dist.all_gather_object((records, err), group)
    world = len(gathered)
    outcome: str | None = None
    if _dist.rank(group) == 0:
        errors = [e for _, e in gathered if e]
        if errors:
            outcome = "; ".join(errors)
        else:
            files: dict[str, dict[str, Any]] = {}
            for r, (recs, _) in enumerate(gathered):
                for name, rec in recs.items():
                    files[name] = {**rec, "rank": r}
            try:
                store.commit(step, files, world_size=world,
                             extra={**extra, "rank_files": [rank_json_name(r) for r in range(world)]})
            except Exception as exc:  # noqa: BLE001
                outcome = f"commit: {exc}"
            else:
                try:
                    store.apply_retention(keep_last, keep_every)
                except Exception as exc:  # noqa: BLE001 - the checkpoint is committed anyway
                    log.warning("retention after step %d failed: %s", step, exc)
    outcome = _dist.broadcast_object(outcome, group)
    if outcome:
        raise StorageError(f"checkpoint step {step} under {store.root} was not committed: {outcome}")


class _KeepStager(BlockingAsyncStager):
    """DCP's blocking CPU stager that keeps the staged copy, so a failed upload can be retried."""

    def __init__(self) -> None:
        super().__init__(cache_staged_state_dict=False, type_check=False)
        self.staged: dict[str, Any] | None = None

    def stage(self, state_dict):
        self.staged = super().stage(state_dict)
        return self.staged


class CheckpointMismatch(StorageError):
    """The checkpoint does not fit the state being loaded (a changed model or state tree)."""


class Checkpointer:
    """Saves and loads the training-state tree under ``root`` (an fsspec URL).

    Every rank constructs it (in the same order relative to other ``new_group`` calls) and
    calls :meth:`save` / :meth:`load` with the same steps. See docs/checkpoints.md.
    """

    def __init__(self, root: str, *, keep_last: int = 2, keep_every: int = 0, async_save: bool = True,
                 process_group=None, verify: str = "checksum", save_attempts: int = 5,
                 collective_timeout: timedelta | None = None) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1 (the newest committed checkpoint is never deleted)")
        if verify not in ("checksum", "size"):
            raise ValueError("verify must be 'checksum' or 'size'")
        self.store = CheckpointStore(root)
        self.root = self.store.root
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_save = async_save
        self.verify = verify
        self.save_attempts = max(1, save_attempts)
        # One gloo group for everything the checkpointer does across ranks: DCP's own
        # collectives (async DCP deadlocks on the training group while it trains) and the
        # commit/load agreement. Created collectively, here, on every rank.
        self._group = _dist.new_gloo_group(process_group, collective_timeout)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._pending_step: int | None = None
        self.last_blocking_s: float = 0.0  # how long the last save() blocked the caller
        self.last_save_s: float = 0.0      # start of save() to commit, for the last committed save
        self.last_loaded_step: int | None = None
        self._closed = False

    # -- helpers -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return _dist.rank(self._group)

    @property
    def world_size(self) -> int:
        return _dist.world(self._group)

    def _writer(self, step: int) -> TrackedFsspecWriter:
        url = self.store.step_url(step)
        return TrackedFsspecWriter(url, storage.storage_options(url), sync_files=self.store.local)

    def _reader(self, step: int) -> SafeFsspecReader:
        url = self.store.step_url(step)
        return SafeFsspecReader(url, storage.storage_options(url))

    @staticmethod
    def _split_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """({name: state_dict} for sharded entries, {name: state_dict} for rank-local ones)."""
        shared, local = {}, {}
        for k, v in state.items():
            if not isinstance(k, str):
                raise TypeError(f"state keys must be str, got {k!r}")
            sd = v.state_dict() if isinstance(v, Stateful) else v
            (local if isinstance(v, RankLocal) else shared)[k] = sd
        return shared, local

    # -- save ----------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any], *, blocking: bool = False) -> None:
        """Checkpoints ``state`` as step ``step``. All ranks call it.

        Async by default: returns once the tensors are copied to host memory; the upload and
        the commit continue in the background (:meth:`wait` to block). A previous save still
        in flight is waited for first. A step that is already committed is not rewritten.
        """
        if self._closed:
            raise RuntimeError("Checkpointer is closed")
        t0 = time.perf_counter()
        _quiet_dcp()
        self.wait()
        step = int(step)
        exists = self.store.is_committed(step) if self.rank == 0 else None
        if _dist.broadcast_object(exists, self._group):
            log.info("checkpoint step %d already committed under %s; not saving it again", step, self.root)
            self.last_blocking_s = time.perf_counter() - t0
            return
        shared, local = self._split_state(state)
        json_tree, tensors = _codec.split(shared)
        local_tree, local_tensors = _codec.split(local)
        rank_blob = _codec.dumps({
            "format": RANK_FILE_FORMAT, "step": step, "rank": self.rank, "world_size": self.world_size,
            "state": json_tree, "local": local_tree,
        })
        local_st = None
        if local_tensors:
            from safetensors.torch import save as st_save

            local_st = st_save({k: t.detach().to("cpu", copy=True).contiguous() for k, t in local_tensors.items()})

        writer = self._writer(step)
        if self.async_save:
            stager = _KeepStager()
            resp = dcp.async_save(tensors, storage_writer=writer, process_group=self._group, async_stager=stager,
                                  no_dist=not _dist.initialized())
            upload = resp.upload_completion if isinstance(resp, AsyncSaveResponse) else resp
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainkit-ckpt")
            self._pending = self._executor.submit(self._finish, step, t0, writer, upload, stager, rank_blob, local_st)
            self._pending_step = step
            self.last_blocking_s = time.perf_counter() - t0
            if blocking:
                self.wait()
        else:
            self._finish(step, t0, writer, None, tensors, rank_blob, local_st)
            self.last_blocking_s = time.perf_counter() - t0

    def _finish(self, step, t0, writer, upload: Future | None, staged, rank_blob: bytes,
                local_st: bytes | None) -> None:
        """Runs on every rank (background thread when async): finish the DCP write with
        retries, write the rank files, then agree and commit on rank 0."""
        err: str | None = None
        records: dict[str, dict[str, Any]] = {}
        try:
            attempt = 0
            while True:
                try:
                    if upload is not None and attempt == 0:
                        upload.result()
                    else:
                        sd = staged.staged if isinstance(staged, _KeepStager) else staged
                        dcp.save(sd, storage_writer=writer, process_group=self._group, no_dist=not _dist.initialized())
                    break
                except (Exception, CheckpointException) as exc:  # noqa: BLE001
                    attempt += 1
                    # CheckpointException carries every rank's failure: all ranks decide alike
                    if attempt >= self.save_attempts or not _is_transient(exc):
                        raise StorageError(f"{self.store.step_url(step)}: DCP save failed: {_short(exc)}") from None
                    log.warning("checkpoint step %d: transient store error (attempt %d/%d), retrying: %s",
                                step, attempt, self.save_attempts, _short(exc)[:300])
                    time.sleep(random.uniform(0, min(5.0, 0.2 * 2**attempt)))
                    writer = self._writer(step)
            records.update(writer.records)
            r = self.rank
            name = rank_json_name(r)
            self.store.put_bytes(self.store.file_path(step, name), rank_blob)
            records[name] = {"size": len(rank_blob), "sha256": sha256_bytes(rank_blob)}
            if local_st is not None:
                name = rank_tensors_name(r)
                self.store.put_bytes(self.store.file_path(step, name), local_st)
                records[name] = {"size": len(local_st), "sha256": sha256_bytes(local_st)}
        except Exception as exc:  # noqa: BLE001 - reported collectively below
            err = f"rank {self.rank}: {exc}" if isinstance(exc, StorageError) else f"rank {self.rank}: {_short(exc)}"
        commit_collectively(self.store, self._group, step, records, err, keep_last=self.keep_last,
                            keep_every=self.keep_every, extra={"kind": "dcp"})
        self.last_save_s = time.perf_counter() - t0
        log.info("checkpoint step %d committed under %s (%.2fs)", step, self.root, self.last_save_s)

    def wait(self) -> None:
        """Blocks until the in-flight save is committed; raises its error if it failed."""
        fut, self._pending = self._pending, None
        self._pending_step = None
        if fut is not None:
            fut.result()

    @property
    def in_flight(self) -> bool:
        return self._pending is not None and not self._pending.done()

    # -- discovery -----------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps (manifest present), ascending."""
        return self.store.committed_steps()

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
        g = self._group
        if self.rank == 0:
            cands = [int(step)] if step is not None else list(reversed(self.store.committed_steps()))
            newest = cands[0] if cands else -1
            torn = sorted(s for s in self.store.step_dirs() if s > newest and s not in cands)
            if torn and step is None:
                msg = (f"ignoring uncommitted checkpoint dir(s) {[step_name(s) for s in torn]} under {self.root} "
                       "(no manifest: an interrupted save)")
                warnings.warn(msg, stacklevel=2)
                log.warning(msg)
        else:
            cands = None
        cands = _dist.broadcast_object(cands, g)
        for s in cands:
            problem = self._try_load(s, state)
            if problem is None:
                self.last_loaded_step = s
                log.info("loaded checkpoint step %d from %s", s, self.root)
                return s
            msg = f"checkpoint {self.store.step_url(s)} skipped: {problem}"
            if step is not None:
                raise StorageError(msg)
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
            if self.rank == 0:
                self.store.quarantine(s)
            _dist.barrier(g)
        return None

    def _agree(self, problem: str | None) -> str | None:
        """Every rank's problem (or None) → the same joined message on all ranks."""
        probs = [p for p in _dist.all_gather_object(problem, self._group) if p]
        return "; ".join(dict.fromkeys(probs)) if probs else None

    def _try_load(self, step: int, state: dict[str, Any]) -> str | None:
        g, r, w = self._group, self.rank, self.world_size
        # 1. the manifest (rank 0) and a listing check
        man, problem = None, None
        if r == 0:
            try:
                man = self.store.read_manifest(step)
                bad = self.store.verify_sizes(step, man)
                if bad:
                    problem = "; ".join(bad)
            except FileNotFoundError:
                problem = f"no {MANIFEST}"
            except (ValueError, StorageError) as exc:
                problem = str(exc)
        man, problem = _dist.broadcast_object((man, problem), g)
        if problem:
            return problem
        # 2. checksums, split over ranks
        if self.verify == "checksum":
            names = sorted(man["files"])[r::w]
            bad = self.store.verify_checksums(step, man, names)
            problem = self._agree("; ".join(bad) if bad else None)
            if problem:
                return problem
        # 3. DCP metadata (safe unpickling) and the structure of the state
        md_info, problem = None, None
        if r == 0:
            try:
                path = self.store.file_path(step, METADATA_FILE)
                raw = self.store._retry(lambda: self.store.fs.cat_file(path), path)
                md = safe_load_metadata(raw)
                md_info = {k: tuple(v.size) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
            except Exception as exc:  # noqa: BLE001
                problem = f"DCP metadata unreadable: {_short(exc)}"
        md_info, problem = _dist.broadcast_object((md_info, problem), g)
        if problem:
            return problem
        shared, local = self._split_state(state)
        _, tensors = _codec.split(shared)
        missing = sorted(k for k in tensors if k not in md_info)
        wrong = sorted(k for k in tensors if k in md_info and tuple(tensors[k].shape) != md_info[k])
        mismatch = None
        if missing or wrong:
            mismatch = (f"checkpoint {self.store.step_url(step)} does not fit the state: "
                        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
                        f"shape mismatch {wrong[:5]}{'...' if len(wrong) > 5 else ''}")
        mismatch = self._agree(mismatch)
        if mismatch:
            raise CheckpointMismatch(mismatch)
        # 4. this rank's JSON (rank r % old world size after a resize)
        rank_doc, local_t, problem = None, {}, None
        src = r % int(man.get("world_size") or 1)
        try:
            p = self.store.file_path(step, rank_json_name(src))
            rank_doc = _codec.loads(self.store._retry(lambda: self.store.fs.cat_file(p), p))
            if rank_doc.get("format") != RANK_FILE_FORMAT:
                raise ValueError(f"{rank_json_name(src)}: unknown format")
            if rank_tensors_name(src) in man["files"]:
                from safetensors.torch import load as st_load

                p2 = self.store.file_path(step, rank_tensors_name(src))
                local_t = st_load(self.store._retry(lambda: self.store.fs.cat_file(p2), p2))
        except Exception as exc:  # noqa: BLE001
            problem = f"rank state {rank_json_name(src)}: {_short(exc)}"
        problem = self._agree(problem)
        if problem:
            return problem
        # 5. the tensors, in place, resharded by DCP to the current layout
        attempt = 0
        while True:
            try:
                dcp.load(tensors, storage_reader=self._reader(step), process_group=g, no_dist=not _dist.initialized())
                break
            except (Exception, CheckpointException) as exc:  # noqa: BLE001
                attempt += 1
                if attempt < self.save_attempts and _is_transient(exc):
                    time.sleep(random.uniform(0, min(5.0, 0.2 * 2**attempt)))
                    continue
                # CheckpointException is the same on every rank; anything else: agree
                problem = f"DCP load failed: {_short(exc)[:2000]}"
                break
        problem = self._agree(problem)
        if problem:
            return problem
        # 6. put the JSON values back around the loaded tensors and hand them over
        def tensor_of(key: str) -> torch.Tensor:
            if key not in tensors:
                raise CheckpointMismatch(f"checkpoint step {step} has tensor {key!r} that the state lacks")
            return tensors[key]

        def local_tensor(key: str) -> torch.Tensor:
            return local_t[key]

        saved = _codec.decode(rank_doc["state"], tensor_of)
        saved_local = _codec.decode(rank_doc.get("local") or {}, local_tensor)
        for k, v in state.items():
            src_tree = saved_local if isinstance(v, RankLocal) else saved
            if k not in src_tree:
                raise CheckpointMismatch(f"checkpoint step {step} has no entry {k!r}; it has {sorted(src_tree)}")
            if isinstance(v, Stateful):
                v.load_state_dict(src_tree[k])
            elif isinstance(v, dict) and isinstance(src_tree[k], dict):
                v.update(src_tree[k])
            else:
                state[k] = src_tree[k]
        return None

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Waits for the in-flight save (raising its error), then releases the thread."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.root!r}, keep_last={self.keep_last}, keep_every={self.keep_every})"


__all__ = ["Checkpointer", "CheckpointMismatch", "step_name"]
