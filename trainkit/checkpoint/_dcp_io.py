"""DCP storage writer/reader on fsspec: every shard a safetensors file, per-file checksums, no
arbitrary unpickling.

DCP (torch.distributed.checkpoint) plans the checkpoint: which rank stores which shard of
which tensor, and how any world size loads it back. How the bytes are stored is the storage
layer's business. torch's own writer frames every tensor with ``torch.save`` (a zip with
its own CRC, written through a Python stream), which ran at a fifth of the disk's speed
here, and its extra writer threads drop a failed file's exception. trainkit's layer:

* :class:`TrackedFsspecWriter` writes ``io_threads`` files per rank, in parallel, each a
  safetensors file (format ``trainkit-safetensors/2``): a JSON header naming every tensor by
  its state-dict key with dtype, shape and byte range, then each shard's bytes exactly as
  they lie in memory, so the framing costs one header and the write runs at disk speed.
  The header's metadata holds each shard's offsets in the full tensor under torch's own
  ``DCP_SHARDING_INFO`` key, which is what torch's ``HuggingFaceStorageReader`` reads, and
  the full tensor sizes under ``trainkit``. No DCP ``.metadata`` pickle is written: the
  headers are the checkpoint's metadata. Each file is checksummed as it is written, so each
  rank knows the size and CRC-32 of its files without reading them back (the commit gathers
  these into the manifest), and a failure in any thread fails the save.
* :class:`SafeFsspecReader` plans from those headers (or, for checkpoints in the first
  format, ``trainkit-raw/1``, from DCP's ``.metadata`` read with an allow-list unpickler) and
  reads each data file once, in offset order, straight into the destination tensor where
  the stored shard and the destination coincide, checksumming every byte against the
  manifest in the same pass: verifying a checkpoint costs no second read.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan,
                                                  SavePlanner, WriteItem, WriteItemType)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from trainkit import storage
from trainkit._compat import FileSystem, FsspecReader, FsspecWriter, StorageInfo
from trainkit.checkpoint._store import Crc32, check_record
from trainkit.errors import StorageError

#: The shard formats, as a manifest names them (``shards``; absent: the first one).
SAFETENSORS = "trainkit-safetensors/2"
RAW = "trainkit-raw/1"
SHARD_FORMATS = (SAFETENSORS, RAW)
METADATA_FILE = ".metadata"  # trainkit-raw/1 only: DCP's pickled metadata
DATA_SUFFIX = {SAFETENSORS: ".safetensors", RAW: ".distcp"}
_DATA_FILE = re.compile(r"__\d+_\d+\.(safetensors|distcp)")

# torch's names for a DCP shard's place in the full tensor (torch/distributed/checkpoint/_hf_utils.py)
SHARDING_KEY = "DCP_SHARDING_INFO"
OFFSETS_KEY = "saved_offsets"
OWN_KEY = "trainkit"

ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.complex64: "C64",
}
_ST_TORCH = {v: k for k, v in ST_DTYPES.items()}


def shard_format(manifest: dict[str, Any], what: str) -> str:
    """The shard format a DCP manifest names; one this trainkit cannot read is an error, not
    a torn checkpoint (it must not be skipped and de-committed)."""
    shards = manifest.get("shards", RAW)
    if shards not in SHARD_FORMATS:
        raise StorageError(f"{what}: shards in format {shards!r}, newer than this trainkit reads "
                           f"({', '.join(SHARD_FORMATS)}); upgrade trainkit")
    return shards


def is_data_file(name: str) -> bool:
    """A DCP shard file (either format), as opposed to the rank files and the manifest."""
    return bool(_DATA_FILE.fullmatch(name))


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, bf16 included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _done(value: Any) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


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


class HashingFileSystem(FileSystem):
    """torch's fsspec ``FileSystem`` that records ``{name: {size, crc32}}`` for each write."""

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

        def record(rec: dict[str, Any]) -> None:
            with self._lock:
                self.records[name] = rec

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


def _item_bytes(item: WriteItem) -> int:
    td = item.tensor_data
    if td is None:
        return 0
    n = 1
    for d in td.chunk.sizes:
        n *= d
    return n * torch.empty((), dtype=td.properties.dtype).element_size()


def _one_chunk_per_key(groups: list[list[WriteItem]]) -> list[list[WriteItem]]:
    """Splits groups so no file holds two shards of one key (safetensors names a tensor
    once); a rank holds one shard per key under DDP and FSDP, so this rarely adds a file."""
    out: list[list[WriteItem]] = []
    for group in groups:
        files: list[tuple[set[str], list[WriteItem]]] = []
        for item in group:
            slot = next((f for f in files if item.index.fqn not in f[0]), None)
            if slot is None:
                slot = (set(), [])
                files.append(slot)
            slot[0].add(item.index.fqn)
            slot[1].append(item)
        out += [items for _, items in files] or [[]]
    return out


def _st_header(items: list[WriteItem]) -> tuple[bytes, list[int]]:
    """The safetensors header for ``items`` in this order, padded to 8 bytes as safetensors
    pads it, and each item's length in bytes."""
    entries: dict[str, Any] = {}
    sharding: dict[str, Any] = {}
    sizes: dict[str, list[int]] = {}
    lengths = []
    pos = 0
    for item in items:
        td = item.tensor_data
        fqn = item.index.fqn
        code = ST_DTYPES.get(td.properties.dtype)
        if code is None:
            raise ValueError(f"{fqn}: dtype {td.properties.dtype} has no safetensors code; trainkit stores "
                             f"{sorted(str(d).removeprefix('torch.') for d in ST_DTYPES)}")
        n = _item_bytes(item)
        entries[fqn] = {"dtype": code, "shape": list(td.chunk.sizes), "data_offsets": [pos, pos + n]}
        sharding[fqn] = {OFFSETS_KEY: list(td.chunk.offsets)}
        sizes[fqn] = list(td.size)
        lengths.append(n)
        pos += n
    meta = {"format": "pt", SHARDING_KEY: json.dumps(sharding, separators=(",", ":")),
            "DCP_VERSION": "1.0", OWN_KEY: json.dumps({"format": SAFETENSORS, "sizes": sizes}, separators=(",", ":"))}
    raw = json.dumps({"__metadata__": meta, **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, lengths


class TrackedFsspecWriter(FsspecWriter):
    def __init__(self, url: str, storage_options: dict[str, Any], *, sync_files: bool, thread_count: int = 1) -> None:
        super().__init__(url, sync_files=sync_files, thread_count=thread_count, overwrite=True, **storage_options)
        self.fs = HashingFileSystem(self.fs)

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        return self.fs.records

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise ValueError(f"{item.index.fqn}: trainkit stores no byte objects in DCP (they go to JSON)")
        prefix = plan.storage_data.prefix
        groups = _one_chunk_per_key(storage.balance(plan.items, self.thread_count, _item_bytes))
        jobs = [(f"{prefix}{i}{DATA_SUFFIX[SAFETENSORS]}", group) for i, group in enumerate(groups)]
        if len(jobs) == 1:
            results = [self._write_file(*jobs[0], planner)]
        else:
            with ThreadPoolExecutor(len(jobs), thread_name_prefix="trainkit-save") as ex:
                results = list(ex.map(lambda job: self._write_file(*job, planner), jobs))
        return _done([r for rs in results for r in rs])

    def _write_file(self, name: str, items: list[WriteItem], planner: SavePlanner) -> list[WriteResult]:
        header, lengths = _st_header(items)
        results = []
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
            _write_all(stream, memoryview(header))
            offset = len(header)
            for item, n in zip(items, lengths):
                t = planner.resolve_data(item).detach()
                t = t.to("cpu").contiguous()
                if t.dtype != item.tensor_data.properties.dtype:  # the header says the plan's dtype
                    raise ValueError(f"{item.index.fqn}: planned as {item.tensor_data.properties.dtype}, "
                                     f"the tensor is {t.dtype}")
                if t.numel() * t.element_size() != n:
                    raise ValueError(f"{item.index.fqn}: planned {n} bytes, the tensor has "
                                     f"{t.numel() * t.element_size()} ({t.dtype}, {tuple(t.shape)})")
                _write_all(stream, _bytes_of(t) if n else memoryview(b""))
                results.append(WriteResult(index=item.index, size_in_bytes=n,
                                           storage_data=StorageInfo(name, offset, n)))
                offset += n
            stream.flush()
            if self.sync_files:
                os.fsync(stream.fileno())
        return results

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Writes nothing: the shard headers are the metadata (no pickle in a checkpoint)."""


def _write_all(stream, view: memoryview) -> None:
    while view:
        view = view[stream.write(view):]


# -- metadata -----------------------------------------------------------------------------

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
    """DCP's pickled ``.metadata`` of a ``trainkit-raw/1`` checkpoint, through an allow-list."""
    md = _SafeUnpickler(io.BytesIO(data)).load()
    if not isinstance(md, Metadata):
        raise pickle.UnpicklingError(f"DCP metadata is a {type(md).__name__}, not Metadata")
    return md


def read_header(fs, path: str, what: str) -> tuple[dict[str, Any], int]:
    """(the parsed safetensors header, where the data starts) of one file, in two ranged reads."""
    head = storage.retry(lambda: fs.cat_file(path, start=0, end=8), what=what)
    if len(head) < 8:
        raise ValueError(f"{what}: not a safetensors file ({len(head)} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > 100 << 20:
        raise ValueError(f"{what}: not a safetensors file (header of {n} bytes)")
    raw = storage.retry(lambda: fs.cat_file(path, start=8, end=8 + n), what=what)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what}: safetensors header is not JSON ({exc})") from None
    if len(raw) != n or not isinstance(header, dict):
        raise ValueError(f"{what}: truncated safetensors header")
    return header, 8 + n


def _metadata_from_headers(headers: dict[str, tuple[dict[str, Any], int]]) -> Metadata:
    """DCP's metadata rebuilt from shard headers: what torch's HuggingFaceStorageReader does,
    plus the exact full sizes trainkit records (an uneven last shard cannot hide a row)."""
    tensors: dict[str, TensorStorageMetadata] = {}
    where: dict[MetadataIndex, StorageInfo] = {}
    for name, (header, start) in sorted(headers.items()):
        meta = header.get("__metadata__") or {}
        sharding = json.loads(meta.get(SHARDING_KEY) or "{}")
        sizes = json.loads(meta.get(OWN_KEY) or "{}").get("sizes", {})
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            dtype = _ST_TORCH.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"{name}: {key}: unknown safetensors dtype {entry['dtype']!r}")
            shape = torch.Size(entry["shape"])
            offsets = torch.Size(sharding.get(key, {}).get(OFFSETS_KEY, [0] * len(shape)))
            b0, b1 = entry["data_offsets"]
            md = tensors.setdefault(key, TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(
                sizes.get(key, [0] * len(shape))), []))
            md.chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=shape))
            if key not in sizes:
                md.size = torch.Size(max(a, o + s) for a, o, s in zip(md.size, offsets, shape))
            where[MetadataIndex(key, offsets)] = StorageInfo(name, start + b0, b1 - b0)
    return Metadata(state_dict_metadata=tensors, storage_data=where)


def read_metadata(fs, step_path: str, files: dict[str, dict[str, Any]] | None, *, what: str,
                  shards: str | None = None, metadata_record: dict[str, Any] | None = None,
                  threads: int = 4) -> tuple[Metadata, str]:
    """(DCP metadata, shard format) of the step at ``step_path``. ``files``: the manifest's
    records (None: list the directory); ``shards``: the format the manifest names (None: the
    one the files show). ``metadata_record``: check a raw/1 ``.metadata`` against it. Raises
    ValueError / pickle.UnpicklingError on anything malformed."""
    if files is None:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in storage.retry(
            lambda: fs.ls(step_path, detail=False), what=what)]
    else:
        names = list(files)
    if shards is None:
        shards = RAW if METADATA_FILE in names else SAFETENSORS
    if shards == RAW:
        data = storage.retry(lambda: fs.cat_file(f"{step_path}/{METADATA_FILE}"), what=f"{what}/{METADATA_FILE}")
        if metadata_record is not None:
            check_record(METADATA_FILE, data, metadata_record)
        return safe_load_metadata(data), RAW
    data_files = sorted(n for n in names if is_data_file(n) and n.endswith(DATA_SUFFIX[SAFETENSORS]))
    if not data_files:
        raise ValueError(f"{what}: no shard files")
    with ThreadPoolExecutor(max(1, min(threads, len(data_files)))) as ex:
        heads = list(ex.map(lambda n: read_header(fs, f"{step_path}/{n}", f"{what}/{n}"), data_files))
    return _metadata_from_headers(dict(zip(data_files, heads))), SAFETENSORS


class SafeFsspecReader(FsspecReader):
    """Loads a trainkit checkpoint step with DCP, resharding to whatever the caller's state
    dict holds: ``dcp.load(state_dict, storage_reader=SafeFsspecReader(url, options))``.

    ``metadata`` (and ``shards``): what :func:`read_metadata` returned, when the caller has
    read it already; otherwise it is read from the step. ``expected`` maps file names to
    manifest records ({size, crc32}); with it, every file a rank reads is read to its end
    and checked (a mismatch raises ValueError after the copy, and the caller falls back to
    an older checkpoint). ``threads`` files are read at once."""

    def __init__(self, url: str, storage_options: dict[str, Any], *,
                 expected: dict[str, dict[str, Any]] | None = None, threads: int = 2,
                 metadata: Metadata | None = None, shards: str | None = None) -> None:
        super().__init__(url, **storage_options)
        self.url = url.rstrip("/")
        self.expected = expected
        self.threads = max(1, threads)
        self._metadata, self.shards = metadata, shards
        self._chunks: dict[tuple[str, tuple[int, ...]], tuple[torch.dtype, torch.Size]] = {}
        self._planner_lock = threading.Lock()

    def read_metadata(self) -> Metadata:  # type: ignore[override]  # no per-rank metadata to fall back on
        if self._metadata is None:
            record = (self.expected or {}).get(METADATA_FILE)
            self._metadata, self.shards = read_metadata(self.fs.fs, str(self.path).rstrip("/"), self.expected,
                                                        what=self.url, shards=self.shards, metadata_record=record,
                                                        threads=self.threads)
        md = self._metadata
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                for chunk in md.chunks:
                    self._chunks[(fqn, tuple(chunk.offsets))] = (md.properties.dtype, chunk.sizes)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise ValueError(f"{item.storage_index.fqn}: byte items are not loaded (trainkit stores none)")
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        files = sorted(per_file)
        if len(files) <= 1 or self.threads == 1:
            for rel in files:
                self._read_file(rel, per_file[rel], planner)
        else:
            with ThreadPoolExecutor(min(self.threads, len(files)), thread_name_prefix="trainkit-load") as ex:
                for fut in [ex.submit(self._read_file, rel, per_file[rel], planner) for rel in files]:
                    fut.result()
        return _done(None)

    def _read_file(self, rel: str, reqs: list[ReadItem], planner: LoadPlanner) -> None:
        """One sequential pass over ``rel``: stored items in offset order; the header, gaps
        and the tail are read too when the file is to be verified."""
        by_item: dict[tuple[int, int, str], list[ReadItem]] = {}
        for req in reqs:
            md = self.storage_data[req.storage_index]
            if self.shards == RAW and RAW not in (md.transform_descriptors or ()):
                raise ValueError(f"{rel}: {req.storage_index.fqn} was not written by trainkit ({RAW})")
            by_item.setdefault((md.offset, md.length, req.storage_index.fqn), []).append(req)
        expected = self.expected.get(rel) if self.expected is not None else None
        if self.expected is not None and expected is None:
            raise ValueError(f"{rel}: DCP data file not listed in the manifest")
        crc = Crc32() if expected else None
        pos = 0
        with self.fs.create_stream(self.fs.concat_path(self.path, rel), "rb") as f:
            for (offset, length, _), items in sorted(by_item.items()):
                if offset < pos:
                    raise ValueError(f"{rel}: overlapping items at offset {offset}")
                if offset > pos:
                    _drain(f, offset - pos, crc, rel)
                self._read_item(f, rel, length, items, planner, crc)
                pos = offset + length
            if crc is not None:
                _drain(f, None, crc, rel)
        if crc is not None and (crc.size != expected["size"] or crc.hexdigest() != expected["crc32"]):
            raise ValueError(f"{rel}: checksum mismatch: {crc.size} bytes crc32 {crc.hexdigest()}, manifest says "
                             f"{expected['size']} bytes crc32 {expected['crc32']}")

    def _read_item(self, f, rel: str, length: int, reqs: list[ReadItem], planner: LoadPlanner,
                   crc: Crc32 | None) -> None:
        first = reqs[0].storage_index
        dtype, sizes = self._chunks[(first.fqn, tuple(first.offset or ()))]
        with self._planner_lock:
            targets = [planner.resolve_tensor(req).detach() for req in reqs]
        whole = (len(reqs) == 1 and tuple(reqs[0].lengths) == tuple(sizes) and not any(reqs[0].storage_offsets))
        t = targets[0]
        if whole and t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() \
                and t.numel() * t.element_size() == length:
            buf = _bytes_of(t)  # the stored shard is this tensor: read straight into it
            _read_into(f, buf, rel)
            if crc is not None:
                crc.update(buf)
        else:
            raw = bytearray(length)
            _read_into(f, memoryview(raw), rel)
            if crc is not None:
                crc.update(raw)
            stored = torch.frombuffer(raw, dtype=dtype).view(sizes) if length else torch.empty(sizes, dtype=dtype)
            for req, target in zip(reqs, targets):
                src = stored
                for dim, (off, n) in enumerate(zip(req.storage_offsets, req.lengths)):
                    if off or n != src.size(dim):
                        src = src.narrow(dim, off, n)
                if target.size() != src.size():
                    raise ValueError(f"{req.storage_index.fqn}: stored {tuple(src.size())}, "
                                     f"expected {tuple(target.size())}")
                target.copy_(src)
        with self._planner_lock:
            for req, target in zip(reqs, targets):
                planner.commit_tensor(req, target)


_BLOCK = 16 << 20


def _read_into(f, buf: memoryview, rel: str) -> None:
    view = buf.cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"{rel}: truncated ({got} of {len(view)} bytes of an item)")
        got += n


def _drain(f, n: int | None, crc: Crc32 | None, rel: str) -> None:
    """Reads ``n`` bytes (None: to the end) into ``crc``; without one, just skips them."""
    if crc is None:
        if n is not None:
            f.seek(n, io.SEEK_CUR)
        return
    left = n
    while left is None or left > 0:
        chunk = f.read(_BLOCK if left is None else min(_BLOCK, left))
        if not chunk:
            if left is not None:
                raise ValueError(f"{rel}: truncated")
            return
        crc.update(chunk)
        if left is not None:
            left -= len(chunk)
