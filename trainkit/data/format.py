"""The shard format: one file of samples with an offsets table, for random access per sample.

Layout of a shard (all integers little-endian)::

    0        8 bytes   magic  b"TKSHARD1"
    8        u32       M = length of the meta JSON
    12       M bytes   meta JSON: {"num_samples": n, "schema": {...}}
    pad      zeros up to a multiple of 8
    T        (n+1) u64 offsets table: absolute file offsets; sample i = [off[i], off[i+1])
    ...      samples

A sample is::

    u32 H | H bytes header JSON: [[nbytes, shape or null], ...] one entry per schema field |
    payload of field 0 | payload of field 1 | ...

``schema`` (also stored in index.json) maps each field name, in payload order, to
``{"kind": tensor|ndarray|bytes|str|int|float|bool, "dtype": "float32"...}`` (``dtype`` for
arrays only). Arrays are raw C-order bytes of their dtype (little-endian); ``str`` is UTF-8;
``int`` is an i64, ``float`` an f64, ``bool`` one byte. Nothing is ever pickled.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from trainkit.errors import ConfigError

MAGIC = b"TKSHARD1"
FORMAT = "trainkit-shards"
VERSION = 1
SHARD_SUFFIX = ".tks"
INDEX_NAME = "index.json"

_TORCH_DTYPES = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64", "int32",
                 "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool")
    if hasattr(torch, name)
}
_ARRAY_KINDS = ("tensor", "ndarray")


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


def _payload(value: Any, spec: Mapping[str, str]) -> tuple[bytes | memoryview, list[int] | None]:
    kind = spec["kind"]
    if kind == "tensor":
        t = value.detach().cpu().contiguous()
        shape = list(t.shape)
        return t.reshape(-1).view(torch.uint8).numpy().tobytes(), shape
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


def encode_sample(sample: Mapping[str, Any], schema: Mapping[str, Mapping[str, str]]) -> bytes:
    if sample.keys() != schema.keys():
        raise ConfigError(f"sample fields {sorted(sample)} differ from the schema {sorted(schema)}")
    payloads = []
    header = []
    for name, spec in schema.items():
        value = sample[name]
        got = field_spec(value)
        if got != dict(spec):
            raise ConfigError(f"field {name!r}: {got} differs from the schema {dict(spec)} set by the first sample")
        data, shape = _payload(value, spec)
        payloads.append(data)
        header.append([len(data), shape])
    h = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([struct.pack("<I", len(h)), h, *payloads])


def decode_sample(buf: bytes | memoryview, schema: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    mv = memoryview(buf)
    (hlen,) = struct.unpack_from("<I", mv, 0)
    header = json.loads(bytes(mv[4 : 4 + hlen]))
    pos = 4 + hlen
    out: dict[str, Any] = {}
    for (name, spec), (n, shape) in zip(schema.items(), header):
        data = mv[pos : pos + n]
        pos += n
        kind = spec["kind"]
        if kind in _ARRAY_KINDS:
            raw = np.frombuffer(data, dtype=np.uint8).copy()  # writable, aligned, owned
            out[name] = torch.from_numpy(raw).view(_TORCH_DTYPES[spec["dtype"]]).reshape(shape)
        elif kind == "bytes":
            out[name] = bytes(data)
        elif kind == "str":
            out[name] = str(data, "utf-8")
        elif kind == "int":
            out[name] = struct.unpack("<q", data)[0]
        elif kind == "float":
            out[name] = struct.unpack("<d", data)[0]
        elif kind == "bool":
            out[name] = data[0] != 0
        else:
            raise ConfigError(f"unknown field kind {kind!r} in shard schema")
    return out


def build_shard(encoded: list[bytes], schema: Mapping[str, Any]) -> bytes:
    """The bytes of one shard holding the already-encoded samples."""
    n = len(encoded)
    meta = json.dumps({"num_samples": n, "schema": schema}, separators=(",", ":")).encode()
    head = MAGIC + struct.pack("<I", len(meta)) + meta
    head += b"\0" * (-len(head) % 8)
    table_at = len(head)
    first = table_at + 8 * (n + 1)
    sizes = np.fromiter((len(e) for e in encoded), dtype=np.uint64, count=n)
    offsets = np.empty(n + 1, dtype="<u8")
    offsets[0] = first
    np.cumsum(sizes, out=offsets[1:])
    offsets[1:] += first
    return b"".join([head, offsets.tobytes(), *encoded])


class ShardHeader:
    """Meta and offsets of one shard, parsed from its first bytes."""

    __slots__ = ("num_samples", "schema", "offsets")

    def __init__(self, num_samples: int, schema: dict, offsets: np.ndarray) -> None:
        self.num_samples = num_samples
        self.schema = schema
        self.offsets = offsets

    @classmethod
    def read(cls, pread, what: str) -> "ShardHeader":
        """``pread(offset, n) -> bytes``; ``what`` names the shard in errors."""
        from trainkit.errors import StorageError

        head = pread(0, 12)
        if len(head) < 12 or head[:8] != MAGIC:
            raise StorageError(f"{what}: not a trainkit shard (bad magic)")
        (mlen,) = struct.unpack_from("<I", head, 8)
        meta = json.loads(pread(12, mlen))
        n = int(meta["num_samples"])
        table_at = 12 + mlen + (-(12 + mlen) % 8)
        raw = pread(table_at, 8 * (n + 1))
        if len(raw) != 8 * (n + 1):
            raise StorageError(f"{what}: truncated offsets table")
        return cls(n, meta["schema"], np.frombuffer(raw, dtype="<u8").astype(np.int64))
