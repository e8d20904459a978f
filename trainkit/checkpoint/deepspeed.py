"""DeepSpeed ZeRO checkpoints on any fsspec URL, with trainkit's commit protocol.

DeepSpeed's ``save_checkpoint`` / ``load_checkpoint`` only take local paths, so:

* save: every rank has DeepSpeed write into its *own* local temp dir (rank 0 gets the model
  states, each rank its ZeRO optimizer partition), then uploads every file it wrote to
  ``root/step_<n>/`` with retries, hashing as it goes; after all ranks uploaded, rank 0
  writes ``manifest.json`` last and moves ``latest`` (same layout and protocol as
  :class:`~trainkit.checkpoint.Checkpointer`). The upload runs in a background thread
  (``async_upload``): training blocks only for DeepSpeed's local write.
* load: every rank downloads the step's DeepSpeed files to a local temp dir, checks each
  against the manifest's size and CRC-32, then calls ``engine.load_checkpoint``. A torn or
  corrupt step is skipped (and de-committed) like with ``Checkpointer``.

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

from torch.distributed.checkpoint.stateful import Stateful

from trainkit import distributed
from trainkit.checkpoint import _codec
from trainkit.checkpoint._protocol import (RANK_FILE_FORMAT, agree, commit_collectively, load_newest,
                                           manifest_agreed, rank_json_name, rank_tensors_name)
from trainkit.checkpoint._store import CheckpointStore, Crc32, record_of, step_name
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
    """Checkpoints a DeepSpeed engine under ``root``; all ranks call ``save``/``load``.

    ``state`` (optional, both calls) maps names to Stateful objects or JSON-able dicts that
    are saved per rank as JSON (+ safetensors for tensors), e.g. ``{"rng": RNGState(),
    "meta": {"step": 10}}``.
    """

    def __init__(self, root: str, *, keep_last: int = 2, keep_every: int = 0, async_upload: bool = True,
                 local_dir: str | None = None, process_group=None) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.store = CheckpointStore(root)
        self.root = self.store.root
        self.keep_last, self.keep_every = keep_last, keep_every
        self.async_upload = async_upload
        self.local_dir = local_dir
        self._group = distributed.new_gloo_group(process_group)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.last_blocking_s = 0.0
        self.commits: list[int] = []  # the steps this checkpointer's own saves committed, in order

    @property
    def rank(self) -> int:
        return distributed.rank(self._group)

    def _state_blob(self, step: int, state: Mapping[str, Any] | None) -> tuple[bytes, bytes | None]:
        trees = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in (state or {}).items()}
        tree, tensors = _codec.split(trees)
        blob = _codec.dumps({"format": RANK_FILE_FORMAT, "step": step, "rank": self.rank,
                             "world_size": distributed.world(self._group), "state": {}, "local": tree})
        st = None
        if tensors:
            from safetensors.torch import save as st_save

            st = st_save({k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()})
        return blob, st

    # -- save ----------------------------------------------------------------------------
    def save(self, step: int, engine, state: Mapping[str, Any] | None = None, *, blocking: bool = False) -> None:
        t0 = time.perf_counter()
        self.wait()
        exists = self.store.is_committed(step) if self.rank == 0 else None
        if distributed.broadcast_object(exists, self._group):
            log.info("checkpoint step %d already committed under %s; not saving it again", step, self.root)
            return
        tag = step_name(step)
        tmp = tempfile.mkdtemp(prefix=f"trainkit-ds-{tag}-r{self.rank}-", dir=self.local_dir)
        try:
            engine.save_checkpoint(tmp, tag=tag, client_state={}, save_latest=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        blob, st = self._state_blob(step, state)
        if self.async_upload:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainkit-ds-ckpt")
            self._pending = self._executor.submit(self._upload_and_commit, step, tmp, tag, blob, st)
            self.last_blocking_s = time.perf_counter() - t0
            if blocking:
                self.wait()
        else:
            self._upload_and_commit(step, tmp, tag, blob, st)
            self.last_blocking_s = time.perf_counter() - t0

    def _upload_and_commit(self, step: int, tmp: str, tag: str, blob: bytes, st: bytes | None) -> None:
        records: dict[str, dict[str, Any]] = {}
        err = None
        try:
            src = os.path.join(tmp, tag)
            for name in sorted(os.listdir(src)):
                local = os.path.join(src, name)
                if os.path.isdir(local):
                    raise StorageError(f"{local}: DeepSpeed wrote a sub-directory; not supported")
                rec = _file_record(local)
                dst = self.store.file_path(step, name)

                def put(local: str = local, dst: str = dst) -> None:
                    self.store.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)  # local stores need it
                    self.store.fs.put_file(local, dst)

                self.store._retry(put, dst)
                records[name] = rec
            name = rank_json_name(self.rank)
            self.store.put_bytes(self.store.file_path(step, name), blob)
            records[name] = record_of(blob)
            if st is not None:
                name = rank_tensors_name(self.rank)
                self.store.put_bytes(self.store.file_path(step, name), st)
                records[name] = record_of(st)
        except Exception as exc:  # noqa: BLE001
            err = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        commit_collectively(self.store, self._group, step, records, err, keep_last=self.keep_last,
                            keep_every=self.keep_every, extra={"kind": "deepspeed", "tag": tag})
        self.commits.append(step)
        log.info("DeepSpeed checkpoint step %d committed under %s", step, self.root)

    def wait(self) -> None:
        fut, self._pending = self._pending, None
        if fut is not None:
            fut.result()

    # -- discovery -----------------------------------------------------------------------
    def steps(self) -> list[int]:
        return self.store.committed_steps()

    def latest_step(self) -> int | None:
        return self.store.valid_latest()

    # -- load ----------------------------------------------------------------------------
    def load(self, engine, state: dict[str, Any] | None = None, step: int | None = None, **load_kwargs) -> int | None:
        """Loads the newest committed step that verifies (or ``step``) into ``engine`` (and
        ``state``); returns the step or None. ``load_kwargs`` go to ``engine.load_checkpoint``."""
        self.wait()
        loaded, _ = load_newest(self.store, self._group, step, lambda s: self._try_load(s, engine, state, load_kwargs))
        return loaded

    def _try_load(self, step: int, engine, state, load_kwargs) -> str | None:
        g, r = self._group, self.rank
        man, problem = manifest_agreed(self.store, g, step, "deepspeed")
        if problem:
            return problem
        tag = man.get("tag") or step_name(step)
        tmp = tempfile.mkdtemp(prefix=f"trainkit-ds-load-r{r}-", dir=self.local_dir)
        try:
            dst_dir = os.path.join(tmp, tag)
            os.makedirs(dst_dir)
            src_rank = r % int(man.get("world_size") or 1)
            rank_doc, local_t = None, {}
            try:
                for name, rec in man["files"].items():
                    if name.startswith("rank_") and name not in (rank_json_name(src_rank), rank_tensors_name(src_rank)):
                        continue
                    local = os.path.join(dst_dir, name)
                    src = self.store.file_path(step, name)
                    self.store._retry(lambda src=src, local=local: self.store.fs.get_file(src, local), src)
                    got = _file_record(local)
                    if (got["size"], got["crc32"]) != (rec["size"], rec["crc32"]):
                        raise StorageError(f"{name}: checksum mismatch")
                with open(os.path.join(dst_dir, rank_json_name(src_rank)), "rb") as f:
                    rank_doc = _codec.loads(f.read())
                st_path = os.path.join(dst_dir, rank_tensors_name(src_rank))
                if os.path.exists(st_path):
                    from safetensors.torch import load_file

                    local_t = load_file(st_path)
            except Exception as exc:  # noqa: BLE001
                problem = f"{type(exc).__name__}: {exc}"
            problem = agree(problem, g)
            if problem:
                return problem
            try:
                path, _client = engine.load_checkpoint(tmp, tag=tag, **load_kwargs)
                if path is None:
                    problem = "DeepSpeed could not load it"
            except Exception as exc:  # noqa: BLE001
                problem = f"DeepSpeed load failed: {type(exc).__name__}: {exc}"
            problem = agree(problem, g)
            if problem:
                return problem
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        saved = _codec.decode(rank_doc.get("local") or {}, lambda k: local_t[k])
        for k, v in (state or {}).items():
            if k not in saved:
                raise StorageError(f"checkpoint step {step} has no state entry {k!r}")
            if isinstance(v, Stateful):
                v.load_state_dict(saved[k])
            elif isinstance(v, dict):
                v.update(saved[k])
            else:
                state[k] = saved[k]
        return None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
