"""DeepSpeed ZeRO checkpoints on any fsspec URL, with trainkit's commit protocol.

DeepSpeed's ``save_checkpoint`` / ``load_checkpoint`` only take local paths, so:

* save: every rank has DeepSpeed write into its *own* local temp dir (rank 0 gets the model
  states, each rank its ZeRO optimizer partition), then uploads every file it wrote to
  ``root/step_<n>/`` (``io_threads`` files at a time) with retries, hashing as it goes;
  after all ranks uploaded, rank 0 writes ``manifest.json`` last and moves ``latest`` (same
  layout and protocol as :class:`~trainkit.checkpoint.DCPCheckpointer`). The upload runs
  in a background thread (``async_save``): training blocks only for DeepSpeed's local write.
* load: every rank downloads the step's DeepSpeed files to a local temp dir, checks each
  against the manifest's size and CRC-32, then calls ``engine.load_checkpoint``. A torn or
  corrupt step is skipped (and de-committed) like with ``DCPCheckpointer``.

Non-tensor training state (RNG, data position, counters) goes to trainkit's per-rank JSON,
not into DeepSpeed's ``client_state`` pickle. DeepSpeed's own files are pickles that it
loads with ``torch.load(weights_only=False)``; trainkit hands it only files whose checksum
matches the manifest, but the manifest lives in the same bucket: only load DeepSpeed
checkpoints from a bucket you trust.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from trainkit import distributed
from trainkit.checkpoint._protocol import (agree, commit_collectively, load_newest, manifest_agreed,
                                           rank_state_agreed)
from trainkit.checkpoint._store import CheckpointStore, Crc32, step_name
from trainkit.checkpoint._tree import RankState, restore, split_state
from trainkit.errors import StorageError

log = logging.getLogger("trainkit.checkpoint")
_CHUNK = 8 << 20


def _file_record(path: str) -> dict[str, Any]:
    crc = Crc32()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc.update(chunk)
    return crc.record()


class DeepSpeedCheckpointer:
    """Checkpoints a DeepSpeed ``engine`` and the rest of the state tree under ``root``; the
    :class:`~trainkit.checkpoint.CheckpointerProtocol` of the DeepSpeed strategy. All ranks
    call ``save``/``load``.

    ``state`` maps names to Stateful objects or JSON-able dicts that are saved per rank as
    JSON (+ safetensors for tensors), e.g. ``{"rng": RNGState(), "meta": {"step": 10}}``;
    model, optimizer and loss scaler are the engine's to save.

    ``io_threads``: files each rank uploads (and downloads) at a time. ``overlap_staging``
    does not apply: DeepSpeed writes its local copy inside :meth:`save`, so when ``save``
    returns nothing of the caller's is read any more and :meth:`staged` never waits. It is
    accepted so that the same ``checkpoint.*`` keys build either checkpointer.
    """

    def __init__(self, root: str, engine: Any, *, keep_last: int = 2, keep_every: int = 0, async_save: bool = True,
                 io_threads: int = 2, overlap_staging: bool = False, local_dir: str | None = None,
                 process_group=None) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        if io_threads < 1:
            raise ValueError("io_threads must be >= 1")
        self.store = CheckpointStore(root)
        self.root = self.store.root
        self.engine = engine
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_save = async_save
        self.io_threads = io_threads
        self.overlap_staging = overlap_staging
        self.local_dir = local_dir
        self._group = distributed.new_gloo_group(process_group)
        self._world = distributed.world(self._group)  # a commit needs every one of them
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.last_blocking_s = 0.0
        self.commits: list[int] = []  # the steps this checkpointer's own saves committed, in order

    @property
    def rank(self) -> int:
        return distributed.rank(self._group)

    def _parallel(self, fn, items: list) -> list:
        """``fn`` over ``items``, ``io_threads`` at a time; the first error is raised."""
        if self.io_threads == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=self.io_threads, thread_name_prefix="trainkit-ds-io") as pool:
            return list(pool.map(fn, items))

    # -- save ----------------------------------------------------------------------------
    def save(self, step: int, state: Mapping[str, Any], *, blocking: bool = False) -> None:
        t0 = time.perf_counter()
        self.wait()
        exists = self.store.is_committed(step) if self.rank == 0 else None
        if distributed.broadcast_object(exists, self._group):
            log.info("checkpoint step %d already committed under %s; not saving it again", step, self.root)
            return
        tag = step_name(step)
        tmp = tempfile.mkdtemp(prefix=f"trainkit-ds-{tag}-r{self.rank}-", dir=self.local_dir)
        try:
            self.engine.save_checkpoint(tmp, tag=tag, client_state={}, save_latest=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _, local = split_state(state, sharded=False)
        rank_state = RankState.encode(step, self.rank, self._world, {}, local)
        if self.async_save:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainkit-ds-ckpt")
            self._pending = self._executor.submit(self._upload_and_commit, step, tmp, tag, rank_state)
            self.last_blocking_s = time.perf_counter() - t0
            if blocking:
                self.wait()
        else:
            self._upload_and_commit(step, tmp, tag, rank_state)
            self.last_blocking_s = time.perf_counter() - t0

    def staged(self) -> float:
        """DeepSpeed's local write is done when ``save`` returns: nothing to wait for."""
        return 0.0

    def _upload_and_commit(self, step: int, tmp: str, tag: str, rank_state: RankState) -> None:
        records: dict[str, dict[str, Any]] = {}
        err = None
        try:
            src = os.path.join(tmp, tag)
            names = sorted(os.listdir(src))
            for name in names:
                if os.path.isdir(os.path.join(src, name)):
                    raise StorageError(f"{os.path.join(src, name)}: DeepSpeed wrote a sub-directory; not supported")

            def upload(name: str) -> dict[str, Any]:
                local = os.path.join(src, name)
                rec = _file_record(local)
                self.store.upload(step, name, local)
                return rec

            records.update(zip(names, self._parallel(upload, names)))
            records.update(rank_state.write(self.store, step, self.rank))
        except Exception as exc:  # noqa: BLE001
            err = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        commit_collectively(self.store, self._group, step, records, err, world_size=self._world,
                            keep_last=self.keep_last, keep_every=self.keep_every,
                            extra={"kind": "deepspeed", "tag": tag})
        self.commits.append(step)
        log.info("DeepSpeed checkpoint step %d committed under %s", step, self.root)

    def wait(self) -> None:
        fut, self._pending = self._pending, None
        if fut is not None:
            fut.result()

    # -- discovery -----------------------------------------------------------------------
    def steps(self) -> list[int]:
        return self.store.committed_steps()

    @property
    def process_group(self) -> Any:
        return self._group

    def latest_step(self) -> int | None:
        return self.store.valid_latest()

    # -- load ----------------------------------------------------------------------------
    def load(self, state: dict[str, Any], step: int | None = None, **load_kwargs) -> int | None:
        """Loads the newest committed step that verifies (or ``step``) into the engine and
        ``state``; returns the step or None. ``load_kwargs`` go to ``engine.load_checkpoint``."""
        self.wait()
        loaded, _ = load_newest(self.store, self._group, step, lambda s: self._try_load(s, state, load_kwargs))
        return loaded

    def _try_load(self, step: int, state: dict[str, Any], load_kwargs) -> str | None:
        g, r = self._group, self.rank
        man, problem = manifest_agreed(self.store, g, step, "deepspeed")
        if problem:
            return problem
        rank_doc, local_t, problem = rank_state_agreed(self.store, g, step, man, verify=True)
        if problem:
            return problem
        tag = man.get("tag") or step_name(step)
        tmp = tempfile.mkdtemp(prefix=f"trainkit-ds-load-r{r}-", dir=self.local_dir)
        try:
            dst_dir = os.path.join(tmp, tag)
            os.makedirs(dst_dir)

            def download(item: tuple[str, dict[str, Any]]) -> None:
                name, rec = item
                local = os.path.join(dst_dir, name)
                self.store.download(step, name, local)
                got = _file_record(local)
                if (got["size"], got["crc32"]) != (rec["size"], rec["crc32"]):
                    raise StorageError(f"{name}: checksum mismatch")

            try:
                self._parallel(download, [(n, rec) for n, rec in man["files"].items() if not n.startswith("rank_")])
            except Exception as exc:  # noqa: BLE001
                problem = f"{type(exc).__name__}: {exc}"
            problem = agree(problem, g)
            if problem:
                return problem
            try:
                path, _client = self.engine.load_checkpoint(tmp, tag=tag, **load_kwargs)
                if path is None:
                    problem = "DeepSpeed could not load it"
            except Exception as exc:  # noqa: BLE001
                problem = f"DeepSpeed load failed: {type(exc).__name__}: {exc}"
            problem = agree(problem, g)
            if problem:
                return problem
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        restore(state, rank_doc, step, tensors={}, local_tensors=local_t, sharded=False)
        return None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
