"""mosaic MDS datasets (mosaicml-streaming's ``MDSWriter``), read-only, as trainkit shards.

``url`` holds MDS's ``index.json`` (``{"version": 2, "shards": [...]}``, each shard entry
``"format": "mds"``) and the ``.mds`` files it names; each file is a shard: fetched whole into
the cache, checked by its size (and by its sha256 when the writer was given
``hashes=["sha256"]``), then sliced in place. A shard file is ``[n: u32][offsets: (n+1) x u32]
[writer config][samples]``; a sample is ``[u32 size of each variable-size column][the columns,
in index order]``.

Decoded values follow trainkit's shard format: integer encodings -> ``int``, floats ->
``float``, ``str``/``bytes``/``json`` as such, ``str_int``/``str_float``/``str_decimal`` ->
``int``/``float``/``Decimal``, ``ndarray[:dtype[:shape]]`` -> a tensor, ``jpeg``/``png`` -> the
encoded bytes (decode them in a ``transform``, as WebDataset fields). A batch decodes every
fixed-size column of the batch's samples with one gather per shard, straight from the mapped
file. ``pkl`` columns are refused: trainkit never unpickles what it reads from storage. Other
encodings (``pil``, image lists) are refused by name when the dataset is opened. Shards
compressed with ``gz`` or ``bz2`` (stdlib) or ``zstd`` (the ``zstd`` package MDSWriter uses) are
decompressed in memory when opened; others are refused.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import torch

from trainkit import storage
from trainkit.data.batch import default_collate, empty
from trainkit.data.cache import ShardInfo
from trainkit.errors import ConfigError, StorageError

INDEX = "index.json"

_INTS = {"int": "<i8", "int8": "<i1", "int16": "<i2", "int32": "<i4", "int64": "<i8", "uint8": "<u1",
         "uint16": "<u2", "uint32": "<u4", "uint64": "<u8"}
_FLOATS = {"float16": "<f2", "float32": "<f4", "float64": "<f8"}
_VAR = {"bytes", "str", "json", "str_int", "str_float", "str_decimal", "jpeg", "png"}
# MDS's codes for an ndarray's dtype when the encoding leaves it open
_ND_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
              34: "float32", 64: "uint64", 65: "int64", 66: "float64"}


def read_mds_index(url: str) -> dict | None:
    """The parsed ``index.json`` at ``url`` if it has MDS's shape, else None (retried; a
    StorageError naming it if it is missing or not JSON)."""
    index = storage.read_json(storage.join(url.rstrip("/"), INDEX))
    if not isinstance(index, dict) or index.get("version") != 2:
        return None
    shards = index.get("shards")
    if not isinstance(shards, list) or not shards:
        return None
    if not all(isinstance(s, dict) and s.get("format") == "mds" for s in shards):
        return None
    return index


@dataclass(frozen=True)
class _Column:
    name: str
    encoding: str
    size: int | None  # bytes in every sample; None: variable, its size precedes the sample
    dtype: str | None = None  # numpy dtype of a number or an array with a known dtype
    shape: tuple[int, ...] | None = None  # an array's fixed shape


def _column(name: str, encoding: str, size: int | None, url: str) -> _Column:
    if encoding == "pkl":
        raise ConfigError(f"{url}: MDS column {name!r} is pickled (encoding 'pkl'); trainkit never unpickles "
                          "data from storage: rewrite it with another encoding (ndarray, json, bytes)")
    if encoding in _INTS or encoding in _FLOATS:
        dtype = _INTS.get(encoding) or _FLOATS[encoding]
        return _Column(name, encoding, np.dtype(dtype).itemsize, dtype)
    if encoding in _VAR:
        return _Column(name, encoding, None)
    kind, _, rest = encoding.partition(":")
    if kind == "ndarray":
        dtype, _, shape = rest.partition(":")
        if dtype and dtype not in _ND_DTYPES.values():
            raise ConfigError(f"{url}: MDS column {name!r}: unknown ndarray dtype {dtype!r}")
        dims = tuple(int(d) for d in shape.split(",")) if shape else None
        fixed = int(np.prod(dims)) * np.dtype(dtype).itemsize if dtype and dims else None
        return _Column(name, encoding, fixed, dtype or None, dims)
    readable = sorted(_INTS) + sorted(_FLOATS) + sorted(_VAR) + ["ndarray[:dtype[:shape]]"]
    raise ConfigError(f"{url}: MDS column {name!r} has encoding {encoding!r}, which trainkit does not read "
                      f"({', '.join(readable)} are read)")


def _spec(c: _Column) -> dict[str, str]:
    if c.encoding in _INTS or c.encoding == "str_int":
        return {"kind": "int"}
    if c.encoding in _FLOATS or c.encoding == "str_float":
        return {"kind": "float"}
    if c.encoding.startswith("ndarray"):
        return {"kind": "ndarray", "dtype": c.dtype or "any"}
    return {"kind": {"str": "str", "json": "json", "str_decimal": "decimal"}.get(c.encoding, "bytes")}


def _decode(c: _Column, raw: bytes | memoryview) -> Any:
    """One value of column ``c`` from its bytes (a copy: nothing refers to the mapping after)."""
    enc = c.encoding
    if c.dtype is not None and c.shape is None and not enc.startswith("ndarray"):
        value = np.frombuffer(raw, c.dtype, count=1)[0]
        return int(value) if enc in _INTS else float(value)
    if enc in ("bytes", "jpeg", "png"):
        return bytes(raw)
    if enc == "str":
        return bytes(raw).decode("utf-8")
    if enc == "json":
        return json.loads(bytes(raw))
    if enc == "str_int":
        return int(bytes(raw).decode())
    if enc == "str_float":
        return float(bytes(raw).decode())
    if enc == "str_decimal":
        return Decimal(bytes(raw).decode())
    at, dtype, shape = 0, c.dtype, c.shape
    if dtype is None:
        dtype, at = _ND_DTYPES[raw[0]], 1
    if shape is None:
        ndim, width = raw[at] >> 2, 1 << (raw[at] & 3)
        shape = tuple(int(d) for d in np.frombuffer(raw, f"<u{width}", count=ndim, offset=at + 1))
        at += 1 + ndim * width
    return torch.from_numpy(np.frombuffer(raw, dtype, offset=at).reshape(shape).copy())


_DECOMPRESS = {"gz": gzip.decompress, "bz2": bz2.decompress}


def _decompressor(name: str, url: str):
    algo = name.split(":", 1)[0]
    if algo in _DECOMPRESS:
        return _DECOMPRESS[algo]
    if algo == "zstd":
        try:
            import zstd
        except ImportError as exc:
            raise ConfigError(f"{url}: zstd-compressed MDS shards need the zstd package (pip install zstd)") from exc
        return zstd.decompress
    raise ConfigError(f"{url}: MDS compression {name!r} is not read by trainkit (none, gz, bz2, zstd are)")


@dataclass
class _Shard:
    """What reading one shard needs: each sample's start and end, the decompressed bytes (None:
    the mapped file itself) and, when every sample has one size, that size (0: they differ)."""

    url: str
    starts: np.ndarray
    ends: np.ndarray
    data: bytes | None
    stride: int
class MDSSource:
    """The shards of an MDS ``index.json``; see the module doc."""

    format = "mds"

    def __init__(self, url: str, index: dict | None = None) -> None:
        self.url = url.rstrip("/")
        index = index if index is not None else read_mds_index(self.url)
        target = storage.join(self.url, INDEX)
        if index is None:
            raise StorageError(f"{target}: not an MDS index (version 2, shards of format 'mds')")
        first = index["shards"][0]
        names, encodings, sizes = first["column_names"], first["column_encodings"], first["column_sizes"]
        self.columns = [_column(n, e, s, self.url) for n, e, s in zip(names, encodings, sizes)]
        for c, size in zip(self.columns, sizes):
            if c.size != size:
                raise StorageError(f"{target}: column {c.name!r} ({c.encoding}) has size {size}, expected {c.size}")
        self.schema = {c.name: _spec(c) for c in self.columns}
        self._var = sum(c.size is None for c in self.columns)
        version = self._version(target)
        self.shards: list[ShardInfo] = []
        self._unzip: list[Any] = []
        for s in index["shards"]:
            if (s["column_names"], s["column_encodings"], s["column_sizes"]) != (names, encodings, sizes):
                raise StorageError(f"{target}: shard {s['raw_data']['basename']} has other columns than the first")
            stored = s.get("zip_data") or s["raw_data"]
            name = stored["basename"]
            tag = hashlib.sha256(f"{name}:{stored['bytes']}:{version}".encode()).hexdigest()
            self.shards.append(ShardInfo(name.replace("/", "__"), storage.join(self.url, name), int(s["samples"]),
                                         int(stored["bytes"]), stored.get("hashes", {}).get("sha256", ""), tag))
            self._unzip.append(_decompressor(s["compression"], self.url) if s.get("zip_data") else None)

    def _version(self, target: str) -> str:
        """index.json's ETag or modification time: a cached shard of an older dataset that has
        the same name and size is not taken for the new one."""
        def info() -> dict:
            fs, path = storage.filesystem(target)
            return fs.info(path)

        got = storage.retry(info, what=target)
        return str(got.get("ETag") or got.get("etag") or got.get("mtime") or got.get("LastModified")
                   or got.get("last_modified") or "")

    def open(self, i: int, buf: Any) -> _Shard:
        shard = self.shards[i]
        data = None
        if self._unzip[i] is not None:
            try:
                data = self._unzip[i](bytes(buf))
            except Exception as exc:  # noqa: BLE001 - each decompressor has its own errors
                raise StorageError(f"{shard.url}: corrupt shard: cannot decompress ({exc})") from exc
        total = len(data if data is not None else buf)
        n = shard.num_samples
        if total < 4 * (n + 2):
            raise StorageError(f"{shard.url}: corrupt shard: {total} bytes cannot hold {n} samples")
        head = np.frombuffer(data if data is not None else buf, "<u4", count=n + 2)
        count, offsets = int(head[0]), head[1:].astype(np.int64)
        del head  # a view of the mapping: it must not outlive the read
        if count != n:
            raise StorageError(f"{shard.url}: corrupt shard: {count} samples, index.json says {n}")
        sizes = np.diff(offsets)
        if offsets[0] < 4 * (n + 2) or (sizes < 4 * self._var).any() or offsets[-1] != total:
            raise StorageError(f"{shard.url}: corrupt shard: sample offsets do not fit its {total} bytes")
        stride = int(sizes[0]) if n and (sizes == sizes[0]).all() else 0
        return _Shard(shard.url, offsets[:-1], offsets[1:], data, stride)

    def _layout(self, buf: Any, st: _Shard, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(offset, size) of every column of the samples ``local``: two (samples, columns) arrays."""
        starts = st.starts[local]
        sizes = np.empty((len(local), len(self.columns)), dtype=np.int64)
        if self._var:
            src = np.frombuffer(st.data if st.data is not None else buf, np.uint8)
            heads = src[starts[:, None] + np.arange(4 * self._var)].view("<u4").astype(np.int64)
            del src
        v = 0
        for f, c in enumerate(self.columns):
            if c.size is None:
                sizes[:, f] = heads[:, v]
                v += 1
            else:
                sizes[:, f] = c.size
        offsets = starts[:, None] + 4 * self._var + np.cumsum(sizes, axis=1) - sizes
        wrong = np.nonzero(offsets[:, -1] + sizes[:, -1] != st.ends[local])[0]
        if len(wrong):
            raise StorageError(f"{st.url}: corrupt shard: the column sizes of sample {int(local[wrong[0]])} "
                               "do not add up to its length")
        return offsets, sizes

    def sample(self, buf: Any, st: _Shard, j: int) -> dict[str, Any]:
        offsets, sizes = self._layout(buf, st, np.array([j], dtype=np.int64))
        view = memoryview(st.data if st.data is not None else buf)
        try:
            return {c.name: self._value(st, c, view[offsets[0, f] : offsets[0, f] + sizes[0, f]])
                    for f, c in enumerate(self.columns)}
        finally:
            view.release()

    @staticmethod
    def _value(st: _Shard, c: _Column, raw: memoryview) -> Any:
        try:
            return _decode(c, raw)
        except (ValueError, KeyError, IndexError) as exc:  # e.g. bad UTF-8, JSON or array header
            raise StorageError(f"{st.url}: corrupt shard: column {c.name!r} ({c.encoding}): {exc}") from exc

    def batch(self, states: Sequence[_Shard], size: int, *, pin: bool, shared: bool) -> "_Batch":
        return _Batch(self, size, pin=pin, shared=shared)


class _Batch:
    """One micro-batch: every fixed-size column one tensor, filled by one gather per shard from
    the mapped file; variable-size columns decoded per sample and collated as
    :func:`default_collate` would."""

    def __init__(self, source: MDSSource, size: int, *, pin: bool, shared: bool) -> None:
        self.source, self.size = source, size
        self._fixed: dict[int, tuple[torch.Tensor, np.ndarray]] = {}
        self._vals: dict[int, list[Any]] = {}
        for f, c in enumerate(source.columns):
            if c.size is None:
                self._vals[f] = [None] * size
            elif c.shape is not None:  # an array of one dtype and shape: its bytes, as they are
                t = empty([size, *c.shape], _torch_dtype(c.dtype), pin=pin, shared=shared)
                self._fixed[f] = (t, t.view(-1).view(torch.uint8).numpy().reshape(size, -1))
            else:  # a number: the batch is int64 or float64, as default_collate makes it
                t = empty([size], torch.int64 if c.encoding in _INTS else torch.float64, pin=pin, shared=shared)
                self._fixed[f] = (t, t.numpy())

    def fill(self, buf: Any, st: _Shard, rows: np.ndarray | None, local: np.ndarray) -> None:
        """The batch's samples ``local`` of the mapped shard ``buf``; ``rows``: where they go in
        the batch (None: all of it, in order)."""
        source, data = self.source, st.data if st.data is not None else buf
        local = np.asarray(local, dtype=np.int64)
        grid = not source._var and st.stride  # every sample one size: the shard is a (samples, bytes) array
        offsets, sizes = (None, None) if grid else source._layout(buf, st, local)
        src = np.frombuffer(data, np.uint8)
        try:
            at = 0
            for f, c in enumerate(source.columns):
                if f not in self._fixed:
                    continue
                dst = self._fixed[f][1]
                if grid:
                    first = int(st.starts[0])
                    column = src[first : first + len(st.starts) * st.stride].reshape(-1, st.stride)
                    column = column[:, at : at + c.size]
                    at += c.size
                    if rows is None and c.shape is not None:
                        np.take(column, local, axis=0, out=dst)  # one copy: mapped file -> batch
                        del column
                        continue
                    raw = np.take(column, local, axis=0)
                    del column
                else:
                    raw = src[offsets[:, f, None] + np.arange(c.size)]
                value = raw if c.shape is not None else raw.view(c.dtype)[:, 0]
                if rows is None:
                    dst[...] = value
                else:
                    dst[rows] = value
                del raw, value
        finally:
            del src
        if self._vals:
            view = memoryview(data)
            try:
                for k, row in enumerate(range(self.size) if rows is None else rows):
                    for f, vals in self._vals.items():
                        o, n = offsets[k, f], sizes[k, f]
                        vals[row] = MDSSource._value(st, source.columns[f], view[o : o + n])
            finally:
                view.release()

    def finish(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f, c in enumerate(self.source.columns):
            if f in self._fixed:
                out[c.name] = self._fixed[f][0]
            else:
                out[c.name] = default_collate([{c.name: v} for v in self._vals[f]])[c.name]
        return out


def _torch_dtype(dtype: str) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
