"""The shard format: one file of samples, laid out for batched reads straight from a mapping.

Version 2 (written since trainkit-shards 2; all integers little-endian)::

    0        8 bytes   magic  b"TKSHARD2"
    8        u32       M = length of the meta JSON
    12       M bytes   meta JSON: {"num_samples": n, "schema": {...}, "columns": [...]}
    pad      zeros up to a multiple of 64: the data region starts here (``base``)
    ...      one column per schema field, each at a multiple of 64 bytes from ``base``

A column holds one field of every sample of the shard. ``columns[f]`` describes field ``f``
of the schema (positions relative to ``base``):

* ``{"layout": "fixed", "at": a, "itemsize": s, "shape": [...]}``: ``n`` values of ``s``
  bytes back to back. Every ``int`` (i64), ``float`` (f64) and ``bool`` (one byte) field is
  fixed, and so is an array field whose samples all have the same shape in this shard.
* ``{"layout": "var", "offsets": o, "data": d}`` (plus ``"dims_index": i, "dims": k`` for
  arrays): ``n + 1`` u64 offsets, sample ``j``'s payload is ``data[off[j]:off[j+1]]``; for
  arrays, sample ``j``'s shape is ``dims[di[j]:di[j+1]]`` (u64 index table, i64 dims).
  ``bytes`` and ``str`` (UTF-8) fields are var, and so are arrays of varying shape.

Arrays are raw C-order bytes of their dtype. Nothing is ever pickled.

Why columns: a micro-batch of a fixed-shape field is then one gather from the mapped file
into the batch tensor (one copy, no per-sample header, no per-sample torch op), while any one
sample is still a fixed number of lookups away (random access, resume mid-shard).

Version 1 shards (``TKSHARD1``: an offsets table of whole samples, each with a JSON header
``[[nbytes, shape|null], ...]`` then its field payloads) stay readable, sample by sample.

``schema`` (also stored in index.json) maps each field name, in column order, to
``{"kind": tensor|ndarray|bytes|str|int|float|bool, "dtype": "float32"...}`` (``dtype`` for
arrays only).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from trainkit.errors import ConfigError, StorageError

MAGIC_V1 = b"TKSHARD1"
MAGIC = b"TKSHARD2"
FORMAT = "trainkit-shards"
VERSION = 2
READABLE_VERSIONS = (1, 2)
SHARD_SUFFIX = ".tks"
INDEX_NAME = "index.json"
ALIGN = 64

_TORCH_DTYPES = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64", "int32",
                 "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool")
    if hasattr(torch, name)
}
_ARRAY_KINDS = ("tensor", "ndarray")
# kind -> (itemsize, torch dtype of the batched column); these fields are always "fixed"
SCALARS = {"int": (8, torch.int64), "float": (8, torch.float64), "bool": (1, torch.bool)}


def torch_dtype(spec: Mapping[str, str]) -> torch.dtype:
    """The dtype a field decodes to (arrays: their own; scalars: what a batch of them is)."""
    kind = spec["kind"]
    return _TORCH_DTYPES[spec["dtype"]] if kind in _ARRAY_KINDS else SCALARS[kind][1]


def is_array(spec: Mapping[str, str]) -> bool:
    return spec["kind"] in _ARRAY_KINDS


def _torch_dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise ConfigError(f"tensor dtype {dtype} cannot be stored in shards")
    return name


def field_spec(value: Any) -> dict[str, str]:
    """The schema entry for one field value."""
    if isinstance(value, torch.Tensor):
        return {"kind": "tensor", "dtype": _torch_dtype_name(value.dtype)}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc" or value.dtype.name not in _TORCH_DTYPES:
            raise ConfigError(f"numpy dtype {value.dtype} cannot be stored in shards (numeric and bool only)")
        return {"kind": "ndarray", "dtype": value.dtype.name}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"kind": "bytes"}
    if isinstance(value, str):
        return {"kind": "str"}
    if isinstance(value, (bool, np.bool_)):
        return {"kind": "bool"}
    if isinstance(value, (int, np.integer)):
        return {"kind": "int"}
    if isinstance(value, (float, np.floating)):
        return {"kind": "float"}
    raise ConfigError(
        f"cannot store a {type(value).__name__} in a shard: use torch.Tensor, np.ndarray, bytes, str, int, float"
    )


def schema_of(sample: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    if not isinstance(sample, Mapping) or not sample:
        raise ConfigError(f"a sample must be a non-empty dict of str -> value, got {type(sample).__name__}")
    out = {}
    for k, v in sample.items():
        if not isinstance(k, str):
            raise ConfigError(f"sample keys must be str, got {k!r}")
        out[k] = field_spec(v)
    return out


def _payload(value: Any, spec: Mapping[str, str]) -> tuple[bytes, list[int] | None]:
    kind = spec["kind"]
    if kind == "tensor":
        t = value.detach().cpu().contiguous()
        return t.reshape(-1).view(torch.uint8).numpy().tobytes(), list(t.shape)
    if kind == "ndarray":
        a = np.ascontiguousarray(value)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        return a.tobytes(), list(a.shape)
    if kind == "bytes":
        return bytes(value), None
    if kind == "str":
        return value.encode("utf-8"), None
    if kind == "int":
        v = int(value)
        if not -(1 << 63) <= v < (1 << 63):
            raise ConfigError(f"int {v} does not fit in 64 bits")
        return struct.pack("<q", v), None
    if kind == "float":
        return struct.pack("<d", float(value)), None
    if kind == "bool":
        return b"\x01" if value else b"\x00", None
    raise AssertionError(kind)


Encoded = list[tuple[bytes, "list[int] | None"]]


def encode_sample(sample: Mapping[str, Any], schema: Mapping[str, Mapping[str, str]]) -> Encoded:
    """One sample's field payloads and shapes, in schema order (checked against the schema)."""
    if sample.keys() != schema.keys():
        raise ConfigError(f"sample fields {sorted(sample)} differ from the schema {sorted(schema)}")
    out: Encoded = []
    for name, spec in schema.items():
        value = sample[name]
        got = field_spec(value)
        if got != dict(spec):
            raise ConfigError(f"field {name!r}: {got} differs from the schema {dict(spec)} set by the first sample")
        out.append(_payload(value, spec))
    return out


def encoded_size(enc: Encoded, schema: Mapping[str, Mapping[str, str]]) -> int:
    """Bytes the sample adds to a shard: its payloads plus an offsets-table entry for each field
    that may be stored "var" (the layout is chosen per shard, so this is a close upper bound)."""
    return sum(len(p) for p, _ in enc) + 8 * sum(spec["kind"] not in SCALARS for spec in schema.values())


def _pad(n: int) -> int:
    return -n % ALIGN


def build_shard(encoded: Sequence[Encoded], schema: Mapping[str, Any]) -> bytes:
    """The bytes of one (version 2) shard holding the already-encoded samples."""
    n = len(encoded)
    chunks: list[bytes] = []
    pos = 0

    def put(data: bytes) -> int:
        nonlocal pos
        at = pos
        chunks.append(data)
        pos += len(data)
        pad = _pad(pos)
        if pad:
            chunks.append(b"\0" * pad)
            pos += pad
        return at

    columns = []
    for f, spec in enumerate(schema.values()):
        payloads = [e[f][0] for e in encoded]
        shapes = [e[f][1] for e in encoded]
        fixed = spec["kind"] in SCALARS or (
            spec["kind"] in _ARRAY_KINDS and all(s == shapes[0] for s in shapes))
        if fixed:
            columns.append({"layout": "fixed", "at": put(b"".join(payloads)), "itemsize": len(payloads[0]),
                            "shape": shapes[0] or []})
            continue
        offsets = np.zeros(n + 1, dtype="<u8")
        np.cumsum([len(p) for p in payloads], out=offsets[1:])
        col = {"layout": "var", "offsets": put(offsets.tobytes()), "data": put(b"".join(payloads))}
        if spec["kind"] in _ARRAY_KINDS:
            di = np.zeros(n + 1, dtype="<u8")
            np.cumsum([len(s) for s in shapes], out=di[1:])
            dims = np.fromiter((d for s in shapes for d in s), dtype="<i8", count=int(di[-1]))
            col["dims_index"] = put(di.tobytes())
            col["dims"] = put(dims.tobytes())
        columns.append(col)
    meta = json.dumps({"num_samples": n, "schema": schema, "columns": columns}, separators=(",", ":")).encode()
    head = MAGIC + struct.pack("<I", len(meta)) + meta
    head += b"\0" * _pad(len(head))
    return b"".join([head, *chunks])


def decode_sample(buf: bytes | memoryview, schema: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """One version-1 sample (JSON header, then its payloads)."""
    mv = memoryview(buf)
    (hlen,) = struct.unpack_from("<I", mv, 0)
    header = json.loads(bytes(mv[4 : 4 + hlen]))
    pos = 4 + hlen
    out: dict[str, Any] = {}
    for (name, spec), (n, shape) in zip(schema.items(), header):
        out[name] = decode_value(mv[pos : pos + n], spec, shape)
        pos += n
    return out


def decode_value(data: memoryview | bytes, spec: Mapping[str, str], shape: Sequence[int] | None) -> Any:
    kind = spec["kind"]
    if kind in _ARRAY_KINDS:
        raw = np.frombuffer(data, dtype=np.uint8).copy()  # writable, aligned, owned
        return torch.from_numpy(raw).view(_TORCH_DTYPES[spec["dtype"]]).reshape(list(shape))
    if kind == "bytes":
        return bytes(data)
    if kind == "str":
        return str(data, "utf-8")
    if kind == "int":
        return struct.unpack("<q", data)[0]
    if kind == "float":
        return struct.unpack("<d", data)[0]
    if kind == "bool":
        return data[0] != 0
    raise ConfigError(f"unknown field kind {kind!r} in shard schema")


class ShardHeader:
    """What a reader needs of one shard, parsed from its first bytes: the sample count, the
    schema, and per version either the offsets table (1) or the columns (2)."""

    __slots__ = ("version", "num_samples", "schema", "offsets", "columns", "base")

    def __init__(self, version: int, num_samples: int, schema: dict, offsets: np.ndarray | None,
                 columns: list[dict] | None, base: int) -> None:
        self.version, self.num_samples, self.schema = version, num_samples, schema
        self.offsets, self.columns, self.base = offsets, columns, base

    @classmethod
    def read(cls, pread, what: str) -> "ShardHeader":
        """``pread(offset, n) -> bytes``; ``what`` names the shard in errors."""
        head = pread(0, 12)
        if len(head) < 12 or head[:8] not in (MAGIC, MAGIC_V1):
            raise StorageError(f"{what}: not a trainkit shard (bad magic)")
        (mlen,) = struct.unpack_from("<I", head, 8)
        try:
            meta = json.loads(pread(12, mlen))
            n = int(meta["num_samples"])
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{what}: unreadable shard meta ({exc})") from exc
        if head[:8] == MAGIC:
            return cls(2, n, meta["schema"], None, meta["columns"], 12 + mlen + _pad(12 + mlen))
        table_at = 12 + mlen + (-(12 + mlen) % 8)
        raw = pread(table_at, 8 * (n + 1))
        if len(raw) != 8 * (n + 1):
            raise StorageError(f"{what}: truncated offsets table")
        return cls(1, n, meta["schema"], np.frombuffer(raw, dtype="<u8").astype(np.int64), None, 0)


def read_sample(buf, h: ShardHeader, j: int) -> dict[str, Any]:
    """Sample ``j`` of a mapped shard, every field decoded (copied out of ``buf``)."""
    if h.version == 1:
        return decode_sample(memoryview(buf)[h.offsets[j] : h.offsets[j + 1]], h.schema)
    out: dict[str, Any] = {}
    for (name, spec), col in zip(h.schema.items(), h.columns):
        if col["layout"] == "fixed":
            size = col["itemsize"]
            at = h.base + col["at"] + j * size
            out[name] = decode_value(memoryview(buf)[at : at + size], spec, col["shape"])
        else:
            data, shape = _var_item(buf, h, col, j)
            out[name] = decode_value(data, spec, shape)
    return out


def _var_item(buf, h: ShardHeader, col: Mapping[str, Any], j: int) -> tuple[memoryview, list[int] | None]:
    base = h.base
    lo, hi = struct.unpack_from("<QQ", buf, base + col["offsets"] + 8 * j)
    data = memoryview(buf)[base + col["data"] + lo : base + col["data"] + hi]
    if "dims" not in col:
        return data, None
    d0, d1 = struct.unpack_from("<QQ", buf, base + col["dims_index"] + 8 * j)
    shape = list(struct.unpack_from(f"<{d1 - d0}q", buf, base + col["dims"] + 8 * d0))
    return data, shape


def field_values(buf, h: ShardHeader, f: int, locals_: Sequence[int]) -> list[Any]:
    """Field ``f`` of the samples ``locals_`` of a version-2 shard, decoded one by one."""
    spec = list(h.schema.values())[f]
    col = h.columns[f]
    if col["layout"] == "var":
        return [decode_value(data, spec, shape) for data, shape in (_var_item(buf, h, col, int(j)) for j in locals_)]
    size, at, mv = col["itemsize"], h.base + col["at"], memoryview(buf)
    return [decode_value(mv[at + j * size : at + (j + 1) * size], spec, col["shape"]) for j in locals_]


def fixed_column(buf, h: ShardHeader, f: int) -> np.ndarray:
    """Field ``f`` of every sample as an (n, itemsize) uint8 view of ``buf`` (no copy)."""
    col = h.columns[f]
    size = col["itemsize"]
    return np.frombuffer(buf, dtype=np.uint8, count=h.num_samples * size,
                         offset=h.base + col["at"]).reshape(h.num_samples, size)
