"""DCP storage writer/reader on fsspec, with per-file checksums and no arbitrary unpickling.

* :class:`TrackedFsspecWriter` is DCP's ``FsspecWriter`` whose streams checksum every byte as
  it is written, so each rank knows the size and CRC-32 of the files it produced without
  reading them back (the commit gathers these to rank 0 for the manifest).
* :class:`SafeFsspecReader` is DCP's ``FsspecReader`` whose ``.metadata`` is read with an
  allow-list unpickler (DCP stores its metadata as a pickle, and loading a pickle from a
  bucket must not be able to run code), and whose data reads go through each file once, in
  offset order, checksumming every byte against the manifest while the tensors are copied
  out: verifying a checkpoint costs no second read. Files are read in parallel threads.
  Tensors are loaded with ``weights_only=True``; trainkit never puts non-tensor objects into
  DCP (they go to JSON), so byte items are refused.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from trainkit.checkpoint._store import Crc32

METADATA_FILE = ".metadata"


class _HashingStream(io.RawIOBase):
    """Write-through wrapper that checksums and counts what passes to ``raw``."""

    def __init__(self, raw: Any, on_close) -> None:
        super().__init__()
        self._raw = raw
        self._crc = Crc32()
        self._on_close = on_close
        self._reported = False

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        mv = memoryview(b).cast("B")
        n = self._raw.write(mv)
        n = len(mv) if n is None else n
        self._crc.update(mv[:n])
        return n

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def finish(self) -> None:
        if not self._reported:
            self._reported = True
            self._on_close(self._crc.record())


class _Sink(io.RawIOBase):
    """Stands in for a file that could not be opened, so the writer thread carries on and
    the failure is raised once, from :meth:`TrackedFsspecWriter.write_data`."""

    def __init__(self) -> None:
        super().__init__()
        self._n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        n = memoryview(b).nbytes
        self._n += n
        return n

    def tell(self) -> int:
        return self._n


class HashingFileSystem(FileSystem):
    """torch's fsspec ``FileSystem`` that records ``{name: {size, crc32}}`` for each write.

    While ``collect_errors`` is set, a failed data file is recorded in ``errors`` instead of
    raised: torch's extra writer threads (``thread_count > 1``) drop exceptions, which would
    leave items silently missing from the checkpoint; collected, they fail the save.
    """

    def __init__(self, inner: FileSystem) -> None:
        super().__init__()
        self.fs = inner.fs
        self.records: dict[str, dict[str, Any]] = {}
        self.errors: list[Exception] = []
        self.collect_errors = False
        self._lock = threading.Lock()

    def _failed(self, exc: Exception) -> None:
        if not self.collect_errors:
            raise exc
        with self._lock:
            self.errors.append(exc)

    @contextmanager
    def create_stream(self, path, mode: str):
        if not any(ch in mode for ch in "wa+"):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = os.path.basename(os.fspath(path))

        def record(rec: dict[str, Any]) -> None:
            with self._lock:
                self.records[name] = rec

        opened = super().create_stream(path, mode)
        try:
            raw = opened.__enter__()
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            yield _Sink()
            return
        hs = _HashingStream(raw, record)
        try:
            yield hs
            raw.flush()
        except Exception as exc:  # noqa: BLE001
            try:
                opened.__exit__(type(exc), exc, exc.__traceback__)
            except Exception:  # noqa: BLE001 - the same failure, re-raised by the inner stream
                pass
            self._failed(exc)
            return
        try:
            opened.__exit__(None, None, None)  # closing uploads the object on object stores
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
            return
        hs.finish()  # only once the object is closed (uploaded) without error

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        old, new = os.path.basename(os.fspath(path)), os.path.basename(os.fspath(new_path))
        with self._lock:
            if old in self.records:
                self.records[new] = self.records.pop(old)


class TrackedFsspecWriter(FsspecWriter):
    def __init__(self, url: str, storage_options: dict[str, Any], *, sync_files: bool, thread_count: int = 1) -> None:
        super().__init__(url, sync_files=sync_files, thread_count=thread_count, overwrite=True, **storage_options)
        self.fs = HashingFileSystem(self.fs)

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        return self.fs.records

    def write_data(self, plan, planner):
        self.fs.collect_errors = True
        try:
            written = super().write_data(plan, planner)
        finally:
            self.fs.collect_errors = False
        if self.fs.errors:
            raise self.fs.errors[0]
        return written


# -- safe metadata ------------------------------------------------------------------------

_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}
_ALLOWED_MODULES = {"torch.distributed.checkpoint.metadata"}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or module in _ALLOWED_MODULES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)):
            return getattr(torch, name)
        if module == "builtins" and name in {"set", "frozenset", "tuple", "list", "dict", "slice", "complex"}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from DCP metadata")


def safe_load_metadata(data: bytes) -> Metadata:
    md = _SafeUnpickler(io.BytesIO(data)).load()
    if not isinstance(md, Metadata):
        raise pickle.UnpicklingError(f"DCP metadata is a {type(md).__name__}, not Metadata")
    return md


class SafeFsspecReader(FsspecReader):
    """``expected`` maps file names to manifest records ({size, crc32}); with it, every file a
    rank reads is read to its end and checked (a mismatch raises ValueError after the copy,
    and the caller falls back to an older checkpoint). ``threads`` files are read at once."""

    def __init__(self, url: str, storage_options: dict[str, Any], *,
                 expected: dict[str, dict[str, Any]] | None = None, threads: int = 2) -> None:
        super().__init__(url, **storage_options)
        self.expected = expected
        self.threads = max(1, threads)
        self._planner_lock = threading.Lock()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            md = safe_load_metadata(f.read())
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        files = sorted(per_file)
        if len(files) <= 1 or self.threads == 1:
            for rel in files:
                self._read_file(rel, per_file[rel], planner)
        else:
            with ThreadPoolExecutor(min(self.threads, len(files)), thread_name_prefix="trainkit-load") as ex:
                for fut in [ex.submit(self._read_file, rel, per_file[rel], planner) for rel in files]:
                    fut.result()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_file(self, rel: str, reqs: list[ReadItem], planner: LoadPlanner) -> None:
        """One sequential pass over ``rel``: stored items in offset order, gaps and the tail
        read too when the file is to be verified."""
        by_item: dict[tuple[int, int], list[ReadItem]] = {}
        for req in reqs:
            md = self.storage_data[req.storage_index]
            by_item.setdefault((md.offset, md.length), []).append(req)
        expected = (self.expected or {}).get(rel) if self.expected is not None else None
        if self.expected is not None and expected is None:
            raise ValueError(f"{rel}: DCP data file not listed in the manifest")
        crc = Crc32()
        pos = 0
        with self.fs.create_stream(self.fs.concat_path(self.path, rel), "rb") as f:
            for (offset, length), items in sorted(by_item.items()):
                if offset < pos:
                    raise ValueError(f"{rel}: overlapping items at offset {offset}")
                if offset > pos:
                    _drain(f, offset - pos, crc if expected else None, rel)
                data = _read_exact(f, length, rel)
                if expected:
                    crc.update(data)
                pos = offset + length
                for req in items:
                    self._load_item(req, data, planner)
            if expected:
                _drain(f, None, crc, rel)
        if expected and (crc.size != expected["size"] or crc.hexdigest() != expected["crc32"]):
            raise ValueError(f"{rel}: checksum mismatch: {crc.size} bytes crc32 {crc.hexdigest()}, manifest says "
                             f"{expected['size']} bytes crc32 {expected['crc32']}")

    def _load_item(self, req: ReadItem, data: bytes, planner: LoadPlanner) -> None:
        if req.type == LoadItemType.BYTE_IO:
            raise ValueError(f"{req.storage_index.fqn}: byte items are not loaded (trainkit stores none)")
        md = self.storage_data[req.storage_index]
        stream = self.transforms.transform_load_stream(req, md.transform_descriptors or (), io.BytesIO(data))
        if not stream.seekable():
            stream = io.BytesIO(stream.read(-1))
        tensor = cast(torch.Tensor, torch.load(stream, map_location="cpu", weights_only=True))
        for dim, (offset, length) in enumerate(zip(req.storage_offsets, req.lengths)):
            if offset or length != tensor.size(dim):
                tensor = tensor.narrow(dim, offset, length)
        with self._planner_lock:
            target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise ValueError(f"{req.storage_index.fqn}: stored {tuple(tensor.size())}, expected {tuple(target.size())}")
        target.copy_(tensor)
        with self._planner_lock:
            planner.commit_tensor(req, target)


_BLOCK = 16 << 20


def _read_exact(f, n: int, rel: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"{rel}: truncated ({len(data)} of {n} bytes at the end)")
    return data


def _drain(f, n: int | None, crc: Crc32 | None, rel: str) -> None:
    """Reads ``n`` bytes (None: to the end) into ``crc``; without one, just skips them."""
    if crc is None and n is not None:
        f.seek(n, io.SEEK_CUR)
        return
    left = n
    while left is None or left > 0:
        chunk = f.read(_BLOCK if left is None else min(_BLOCK, left))
        if not chunk:
            if left is not None:
                raise ValueError(f"{rel}: truncated")
            return
        if crc is not None:
            crc.update(chunk)
        if left is not None:
            left -= len(chunk)
