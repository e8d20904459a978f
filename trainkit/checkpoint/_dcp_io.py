"""DCP storage writer/reader on fsspec, with per-file checksums and no arbitrary unpickling.

* :class:`TrackedFsspecWriter` is DCP's ``FsspecWriter`` whose streams hash every byte as it
  is written, so each rank knows the size and SHA-256 of the files it produced without
  reading them back (the commit gathers these to rank 0 for the manifest).
* :class:`SafeFsspecReader` is DCP's ``FsspecReader`` whose ``.metadata`` is read with an
  allow-list unpickler: DCP stores its metadata as a pickle, and loading a pickle from a
  bucket must not be able to run code. Tensors are read by DCP with ``weights_only=True``;
  trainkit never puts non-tensor objects into DCP (they go to JSON), so DCP's
  ``torch.load(weights_only=False)`` path for byte objects is never reached.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import threading
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA_FILE = ".metadata"


class _HashingStream(io.RawIOBase):
    """Write-through wrapper that hashes and counts what passes to ``raw``."""

    def __init__(self, raw: Any, on_close) -> None:
        super().__init__()
        self._raw = raw
        self._sha = hashlib.sha256()
        self._size = 0
        self._on_close = on_close
        self._reported = False

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        mv = memoryview(b).cast("B")
        n = self._raw.write(mv)
        n = len(mv) if n is None else n
        self._sha.update(mv[:n])
        self._size += n
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
            self._on_close(self._size, self._sha.hexdigest())


class HashingFileSystem(FileSystem):
    """torch's fsspec ``FileSystem`` that records ``{name: (size, sha256)}`` for each write."""

    def __init__(self, inner: FileSystem) -> None:
        super().__init__()
        self.fs = inner.fs
        self.records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode: str):
        if not any(ch in mode for ch in "wa+"):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        name = os.path.basename(os.fspath(path))

        def record(size: int, sha: str) -> None:
            with self._lock:
                self.records[name] = {"size": size, "sha256": sha}

        with super().create_stream(path, mode) as raw:
            hs = _HashingStream(raw, record)
            yield hs
            raw.flush()
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
    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        super().__init__(url, **storage_options)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            md = safe_load_metadata(f.read())
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md
