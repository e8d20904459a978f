"""Arrow data as trainkit shards: the columnar batch that Arrow and Parquet share, and Arrow IPC
datasets as Hugging Face ``datasets``' ``save_to_disk`` writes them.

**Batches.** A shard, once read (:func:`prepare`), is one Arrow array per field plus, where
every row of the shard has the same shape, a numpy view of its values as ``(rows, *shape)``
(zero-copy: a primitive column, a ``FixedSizeList`` or regular nested lists). A micro-batch
(:class:`ColumnBatch`) is then one tensor per such field, preallocated for the batch (pinned, or
in shared memory in a DataLoader worker) and filled by one numpy gather per shard: the only
copy. Fields whose shape varies within a shard (token lists), strings and binary are taken per
batch and collated like ``default_collate`` of the decoded samples, so a batch equals it value
for value.

**Arrow IPC datasets.** ``save_to_disk`` writes a folder of ``data-0000k-of-0000n.arrow`` files
(Arrow IPC *streams* of record batches of ``writer_batch_size`` rows), ``state.json`` (the files,
in order) and ``dataset_info.json`` (the features). Each record batch plays the part of a
shard; a file's batches share its cache entry, fetched whole. The layout comes from the
batches' message headers alone (a few hundred bytes each, read with range requests that skip
the bodies); a batch is then read in place from the mapped file (no decoding, no copy before
the gather) and validated. ``url`` may be such a folder (or a folder of ``.arrow`` files, or
one file; IPC *file* format too); a ``DatasetDict`` root is refused with the splits to choose
from. Hugging Face's extension types (``Array2D``..``Array5D``) are read as their storage
(nested lists); dictionary-encoded columns and other types are refused by column name.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from trainkit import storage
from trainkit.data.batch import empty, split_batch
from trainkit.data.cache import ShardInfo
from trainkit.data.format import SCALARS, field_spec, torch_dtype
from trainkit.errors import ConfigError, StorageError

SUFFIX = ".arrow"
STATE = "state.json"
DICT = "dataset_dict.json"
_SCAN_BYTES = 64 << 10  # one range request reads this much of a file's message headers ahead


def data_files(url: str, suffix: str) -> list[dict[str, Any]]:
    """``[{"url", "path", "bytes", "tag"}]`` of the ``suffix`` files at ``url`` (a file, or a
    prefix searched recursively, sorted by path); ``tag`` names the file's version."""
    fs, path = storage.filesystem(url)
    proto = url.split("://", 1)[0] + "://" if "://" in url else ""

    def listing() -> dict[str, dict]:
        if path.endswith(suffix) and fs.isfile(path):
            return {path: fs.info(path)}
        try:
            return fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        finally:  # keep no listing: a file written later must not look absent
            fs.invalidate_cache(path)

    found = storage.retry(listing, what=url)
    out = []
    for p in sorted(found):
        info = found[p]
        if not p.endswith(suffix) or info.get("type") == "directory":
            continue
        version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
        out.append({"url": proto + p if proto else p, "path": p, "bytes": int(info["size"]),
                    "tag": hashlib.sha256(f"{p}:{info['size']}:{version}".encode()).hexdigest()})
    return out


def kind(name: str, t) -> dict[str, str]:
    """The shard-format kind of an Arrow column type (see the Parquet module doc)."""
    import pyarrow as pa

    if isinstance(t, pa.ExtensionType):
        t = t.storage_type
    if pa.types.is_boolean(t):
        return {"kind": "bool"}
    if pa.types.is_integer(t):
        return {"kind": "int"}
    if pa.types.is_floating(t):
        return {"kind": "float"}
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return {"kind": "str"}
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return {"kind": "bytes"}
    leaf = t
    while _is_list(leaf):
        leaf = leaf.value_type
    if leaf is not t and (pa.types.is_integer(leaf) or pa.types.is_floating(leaf) or pa.types.is_boolean(leaf)):
        return {"kind": "ndarray", "dtype": field_spec(np.zeros(0, dtype=leaf.to_pandas_dtype()))["dtype"]}
    raise ConfigError(f"column {name!r} of type {t} cannot be read by trainkit "
                      "(numbers, strings, binary and lists of numbers can)")


def _is_list(t) -> bool:
    import pyarrow as pa

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _storage(a):
    import pyarrow as pa

    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks()  # one chunk (a row group, a record batch): no copy
    return a.storage if isinstance(a, pa.ExtensionArray) else a


def fixed_view(a) -> np.ndarray | None:
    """``(rows, *shape)`` numpy view of a numeric column (or lists of lists ... of numbers) whose
    rows all have one shape; None when the shape varies. Zero-copy for numbers without nulls.
    The offsets it reads are checked against the values they index (a corrupt file must not
    read out of bounds)."""
    rows = len(a)
    shape: list[int] = []
    while _is_list(a.type):
        if a.null_count:
            raise ConfigError(f"a column has {a.null_count} null lists; trainkit needs a value in every row")
        if hasattr(a.type, "list_size"):
            shape.append(a.type.list_size)
            a = a.flatten()
            continue
        off = a.offsets.to_numpy()
        n = len(off) - 1
        step = int(off[-1] - off[0]) // n if n else 0
        if n and (off[0] < 0 or off[-1] > len(a.values)):
            raise ValueError(f"list offsets [{off[0]}, {off[-1]}] outside the {len(a.values)} values")
        if n and not (off[1:] - off[:-1] == step).all():
            return None
        shape.append(step)
        a = a.flatten()
    if a.null_count:
        raise ConfigError(f"a column has {a.null_count} nulls; trainkit needs a value in every row")
    return a.to_numpy(zero_copy_only=False).reshape(rows, *shape)


def prepare(table, schema: Mapping[str, Mapping[str, str]], *,
            full_check: bool = False) -> list[tuple[np.ndarray | None, Any]]:
    """A read shard (a record batch or a table of one row group): per field (its fixed-shape
    view or None, its Arrow array). ``full_check``: the shard's buffers come from a file as it
    is (Arrow IPC, not decoded by a reader that checks them): the offsets of variable fields
    are validated too (fixed-shape ones are by :func:`fixed_view`)."""
    out = []
    for name, spec in schema.items():
        a = _storage(table.column(name))
        if a.null_count:
            raise ConfigError(f"column {name!r} has {a.null_count} nulls; trainkit needs a value in every row")
        view = fixed_view(a) if spec["kind"] in SCALARS or spec["kind"] == "ndarray" else None
        if view is None and full_check:
            a.validate(full=True)  # offsets into strings, binary, ragged lists
        out.append((view, a))
    return out


def _values(a, spec: Mapping[str, str], local: np.ndarray, name: str) -> list[Any]:
    """The batch's values of a variable field, one per sample (what ``sample`` decodes)."""
    import pyarrow as pa

    taken = a.take(pa.array(np.asarray(local, dtype=np.int64)))
    if spec["kind"] in ("str", "bytes"):
        return taken.to_pylist()
    out = []
    for k in range(len(taken)):
        v = fixed_view(taken.slice(k, 1))
        if v is None:
            raise ConfigError(f"field {name!r}: a sample's nested lists are ragged; trainkit reads regular arrays")
        out.append(torch.from_numpy(np.array(v[0])))
    return out


class ColumnBatch:
    """One micro-batch of ``size`` samples from prepared shards (``states``: those of every
    shard the batch touches), filled shard by shard; see the module doc."""

    def __init__(self, schema: Mapping[str, Mapping[str, str]], states: Sequence[list], size: int, *,
                 pin: bool, shared: bool) -> None:
        self.schema, self.size, self.pin, self.shared = schema, size, pin, shared
        self._names = list(schema)
        self._fixed: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self._vals: dict[int, list[Any]] = {}
        for f, spec in enumerate(schema.values()):
            views = [st[f][0] for st in states]
            if views and all(v is not None and v.shape[1:] == views[0].shape[1:] for v in views):
                t = empty([size, *views[0].shape[1:]], torch_dtype(spec), pin=pin, shared=shared)
                self._fixed[f] = (t, t.numpy())
            else:
                self._vals[f] = [None] * size

    def accepts(self, state: list) -> bool:
        """Whether a shard the batch was not built for can fill part of it (see ``BatchBuilder``)."""
        return all(state[f][0] is not None and state[f][0].shape[1:] == t.shape[1:]
                   for f, (t, _dst) in self._fixed.items())

    def fill(self, buf: Any, state: list, rows: np.ndarray | None, local: np.ndarray) -> None:
        for f, (_t, dst) in self._fixed.items():
            src = state[f][0]
            if rows is None and src.dtype == dst.dtype:
                np.take(src, local, axis=0, out=dst)  # one copy: the shard's buffer -> the batch
            else:
                dst[slice(None) if rows is None else rows] = src[local]
        where = range(self.size) if rows is None else rows
        for f, vals in self._vals.items():
            name = self._names[f]
            for k, v in zip(where, _values(state[f][1], self.schema[name], local, name)):
                vals[k] = v

    def finish(self) -> dict[str, Any]:
        return self.finish_split([0, self.size])[0]

    def finish_split(self, bounds: Sequence[int]) -> list[dict[str, Any]]:
        return split_batch(self.schema, bounds, self._fixed, self._vals, pin=self.pin, shared=self.shared)


def sample_of(schema: Mapping[str, Mapping[str, str]], state: list, j: int) -> dict[str, Any]:
    """Sample ``j`` of a prepared shard, decoded (numbers as Python numbers, arrays as tensors)."""
    b = ColumnBatch(schema, [state], 1, pin=False, shared=False)
    b.fill(None, state, None, np.array([j]))
    out = {}
    for name, v in b.finish().items():
        if isinstance(v, torch.Tensor):
            out[name] = v[0].item() if schema[name]["kind"] in SCALARS else v[0].clone()
        else:
            out[name] = v[0]
    return out


# -- Arrow IPC message headers (flatbuffers; format/Message.fbs) ------------------------------
_SCHEMA, _DICTIONARY, _RECORD_BATCH = 1, 2, 3


def _field(buf: bytes, table: int, k: int) -> int | None:
    """Position of field ``k`` of the flatbuffer table at ``table``, None when absent."""
    vtable = table - struct.unpack_from("<i", buf, table)[0]
    if 4 + 2 * k >= struct.unpack_from("<H", buf, vtable)[0]:
        return None
    off = struct.unpack_from("<H", buf, vtable + 4 + 2 * k)[0]
    return table + off if off else None


def _message(meta: bytes) -> tuple[int, int, int]:
    """(header type, body length, rows of a record batch) of one message's metadata."""
    msg = struct.unpack_from("<I", meta, 0)[0]
    p = _field(meta, msg, 1)
    htype = meta[p] if p is not None else 0
    p = _field(meta, msg, 3)
    body = struct.unpack_from("<q", meta, p)[0] if p is not None else 0
    rows = 0
    p = _field(meta, msg, 2)
    if htype == _RECORD_BATCH and p is not None:
        header = p + struct.unpack_from("<I", meta, p)[0]
        q = _field(meta, header, 0)
        rows = struct.unpack_from("<q", meta, q)[0] if q is not None else 0
    return htype, body, rows


def scan(url: str, size: int):
    """(schema, [(offset, length, rows) of each record batch's message]) of an Arrow IPC file,
    from its message headers alone."""
    import pyarrow as pa

    fs, path = storage.filesystem(url)
    window = {"start": 0, "data": b""}

    def read(off: int, n: int) -> bytes:
        start, data = window["start"], window["data"]
        if off < start or off + n > start + len(data):
            end = min(size, off + max(n, _SCAN_BYTES))
            data = storage.retry(lambda: fs.cat_file(path, start=off, end=end), what=url)
            window["start"], window["data"], start = off, data, off
        got = data[off - start: off - start + n]
        if len(got) != n:
            raise StorageError(f"{url}: not a readable Arrow IPC file (truncated at byte {off})")
        return got

    schema = None
    batches: list[tuple[int, int, int]] = []
    off = 8 if size >= 8 and read(0, 6) == b"ARROW1" else 0
    try:
        while off + 4 <= size:
            (cont,) = struct.unpack("<I", read(off, 4))
            if cont == 0xFFFFFFFF:
                (mlen,) = struct.unpack("<i", read(off + 4, 4))
                hdr = off + 8
            else:  # the format before the continuation marker
                mlen, hdr = cont, off + 4
            if mlen == 0:
                break  # end of stream (an IPC file's footer follows)
            htype, body, rows = _message(read(hdr, mlen))
            end = hdr + mlen + body
            if htype == _SCHEMA:
                schema = pa.ipc.read_schema(pa.py_buffer(read(off, end - off)))
            elif htype == _DICTIONARY:
                raise ConfigError(f"{url}: dictionary-encoded columns cannot be read by trainkit")
            elif htype == _RECORD_BATCH:
                batches.append((off, end - off, rows))
            off = end
            if size - off <= 8:
                break  # only the end-of-stream marker is left: no request to read it
    except (struct.error, IndexError, pa.ArrowException) as exc:
        raise StorageError(f"{url}: not a readable Arrow IPC file ({exc})") from exc
    if schema is None:
        raise StorageError(f"{url}: not a readable Arrow IPC file (no schema message)")
    return schema, batches


class ArrowSource:
    """Record batches of Arrow IPC files as shards; see the module doc."""

    format = "arrow"

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        files = self._files()
        with ThreadPoolExecutor(min(16, len(files))) as pool:
            layouts = list(pool.map(lambda f: scan(f["url"], f["bytes"]), files))
        self._schema = layouts[0][0]
        self.schema = {name: kind(name, t) for name, t in zip(self._schema.names, self._schema.types)}
        self.shards: list[ShardInfo] = []
        self._where: list[tuple[int, int]] = []  # shard -> (offset, length) of its message
        base = self.url if not self.url.endswith(SUFFIX) else self.url.rsplit("/", 1)[0]
        for f, (schema, batches) in zip(files, layouts):
            if schema.names != self._schema.names:
                raise StorageError(f"{f['url']}: columns {schema.names} differ from {self._schema.names} "
                                   "of the first file")
            rel = f["url"][len(base):].strip("/").replace("/", "__") or f["url"].rsplit("/", 1)[-1]
            for off, length, rows in batches:
                if rows:
                    self.shards.append(ShardInfo(rel, f["url"], rows, f["bytes"], "", f["tag"]))
                    self._where.append((off, length))
        if not self.shards:
            raise StorageError(f"{self.url}: the Arrow files hold no rows")

    def _files(self) -> list[dict[str, Any]]:
        listed = {f["url"]: f for f in data_files(self.url, "")}  # one listing
        found = [f for f in listed.values() if f["url"].endswith(SUFFIX)]
        if self.url.endswith(SUFFIX):
            return found
        dd, state = storage.join(self.url, DICT), storage.join(self.url, STATE)
        if dd in listed:
            splits = storage.read_json(dd).get("splits", [])
            raise ConfigError(f"{self.url} is a Hugging Face DatasetDict: read one split, e.g. "
                              f"{storage.join(self.url, splits[0] if splits else 'train')}")
        if state in listed:
            names = [d["filename"] for d in storage.read_json(state).get("_data_files", [])]
            missing = [n for n in names if storage.join(self.url, n) not in listed]
            if missing:
                raise StorageError(f"{state} names {missing[0]}, which is not there")
            return [listed[storage.join(self.url, n)] for n in names]
        if not found:
            raise StorageError(f"no .arrow files at {self.url}")
        return found

    def open(self, i: int, buf: Any) -> list:
        import pyarrow as pa

        shard = self.shards[i]
        off, length = self._where[i]
        try:
            message = pa.ipc.read_message(pa.py_buffer(buf).slice(off, length))
            batch = pa.ipc.read_record_batch(message, self._schema)
            batch.validate()  # buffer sizes; offsets: in prepare
            if batch.num_rows != shard.num_samples:
                raise ValueError(f"a record batch has {batch.num_rows} rows, its header said {shard.num_samples}")
            return prepare(batch, self.schema, full_check=True)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise StorageError(f"{shard.url}: corrupt Arrow file: {exc}") from exc

    def sample(self, buf: Any, state: list, j: int) -> dict[str, Any]:
        return sample_of(self.schema, state, j)

    def batch(self, states: Sequence[list], size: int, *, pin: bool, shared: bool) -> ColumnBatch:
        return ColumnBatch(self.schema, states, size, pin=pin, shared=shared)
