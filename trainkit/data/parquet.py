"""Parquet datasets (pyarrow): each row group plays the part of a trainkit shard.

``url`` is a ``.parquet`` file or a prefix holding them (searched recursively, sorted by path,
as Hugging Face ``datasets``' ``to_parquet``, Ray Data and DuckDB write them). The layout
comes from the files' footers alone (one metadata read per file, concurrently); the order,
the windows and the exact resume then work on row groups exactly as on trainkit shards. The
cache fetches whole files (the row groups of a file share one cache entry, which is needed
as soon as the first of them is); a file is checked by its size and by pyarrow as it is
read, since Parquet carries no checksum of the whole file, and its cache name carries its
size and modification time or ETag, so a rewritten file is fetched again.

Columns map onto the shard format's kinds: integers -> ``int``, floats -> ``float``,
booleans -> ``bool``, strings -> ``str``, binary -> ``bytes``, (nested) lists of numbers ->
``ndarray`` (a tensor per sample; a batch stacks them when their shapes agree). Other types
(structs, maps, dictionaries) are refused when the dataset is opened, by column name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from trainkit import storage
from trainkit.data.batch import _stack, empty
from trainkit.data.cache import ShardInfo
from trainkit.data.format import SCALARS, field_spec, torch_dtype
from trainkit.errors import ConfigError, StorageError

SUFFIX = ".parquet"


def parquet_files(url: str) -> list[dict[str, Any]]:
    """``[{"url", "bytes", "tag"}]`` of the Parquet files at ``url`` (a file or a prefix)."""
    fs, path = storage.filesystem(url)
    proto = url.split("://", 1)[0] + "://" if "://" in url else ""

    def listing() -> dict[str, dict]:
        if path.endswith(SUFFIX) and fs.isfile(path):
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
        if not p.endswith(SUFFIX) or info.get("type") == "directory":
            continue
        version = str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")
        out.append({"url": proto + p if proto else p, "path": p, "bytes": int(info["size"]),
                    "tag": hashlib.sha256(f"{p}:{info['size']}:{version}".encode()).hexdigest()})
    return out


def _kind(name: str, t) -> dict[str, str]:
    import pyarrow as pa

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
    while pa.types.is_list(leaf) or pa.types.is_large_list(leaf) or pa.types.is_fixed_size_list(leaf):
        leaf = leaf.value_type
    if leaf is not t and (pa.types.is_integer(leaf) or pa.types.is_floating(leaf) or pa.types.is_boolean(leaf)):
        return {"kind": "ndarray", "dtype": field_spec(np.zeros(0, dtype=leaf.to_pandas_dtype()))["dtype"]}
    raise ConfigError(f"Parquet column {name!r} of type {t} cannot be read by trainkit "
                      "(numbers, strings, binary and lists of numbers can)")


def _array(a, spec: dict[str, str]):
    """A pyarrow (nested) list array -> (leaf values as numpy, the list lengths at each depth, rows)."""
    import pyarrow as pa

    dims: list[np.ndarray] = []
    rows = len(a)
    while pa.types.is_list(a.type) or pa.types.is_large_list(a.type) or pa.types.is_fixed_size_list(a.type):
        if pa.types.is_fixed_size_list(a.type):
            lengths = np.full(len(a), a.type.list_size, dtype=np.int64)
        else:
            lengths = np.diff(a.offsets.to_numpy())
        dims.append(lengths)
        a = a.flatten()
    values = a.to_numpy(zero_copy_only=False)
    return values, dims, rows


def column_values(col, spec: dict[str, str], size: int, *, pin: bool = False, shared: bool = False) -> Any:
    """One column of ``size`` rows as a batch: a tensor (scalars, regular arrays) or a list."""
    if col.null_count:
        raise ConfigError(f"a Parquet column has {col.null_count} nulls; trainkit needs a value in every row")
    kind = spec["kind"]
    if kind in SCALARS:
        t = empty([size], torch_dtype(spec), pin=pin, shared=shared)
        t.numpy()[...] = col.to_numpy(zero_copy_only=False)
        return t
    if kind in ("str", "bytes"):
        return col.to_pylist()
    values, dims, rows = _array(col, spec)
    dtype = torch_dtype(spec)
    if rows and all(len(d) and (d == d[0]).all() for d in dims):
        # regular: every list at every depth has one length, so the leaves reshape into the batch
        shape = [int(d[0]) for d in dims]
        t = empty([size, *shape], dtype, pin=pin, shared=shared)
        t.numpy()[...] = values.reshape(t.shape)  # one copy: Arrow's buffer -> the batch
        return t
    np_dtype = values.dtype
    return [torch.from_numpy(np.asarray(row, dtype=np_dtype)) for row in col.to_pylist()]


class ParquetSource:
    """Row groups of Parquet files as shards; see the module doc."""

    format = "parquet"

    def __init__(self, url: str) -> None:
        import pyarrow.parquet as pq

        self.url = url.rstrip("/")
        files = parquet_files(self.url)
        if not files:
            raise StorageError(f"no .parquet files at {self.url}")

        def footer(f: dict[str, Any]):
            def read():
                fs, path = storage.filesystem(f["url"])
                with fs.open(path, "rb") as fh:
                    return pq.read_metadata(fh)

            try:
                return storage.retry(read, what=f["url"])
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a bad file
                raise StorageError(f"{f['url']}: not a readable Parquet file ({exc})") from exc

        with ThreadPoolExecutor(min(16, len(files))) as pool:
            metas = list(pool.map(footer, files))
        self.schema = {name: _kind(name, t) for name, t in zip(metas[0].schema.to_arrow_schema().names,
                                                                metas[0].schema.to_arrow_schema().types)}
        self.shards: list[ShardInfo] = []
        self._where: list[tuple[int, int]] = []  # shard -> (file, row group)
        base = self.url if not self.url.endswith(SUFFIX) else self.url.rsplit("/", 1)[0]
        for k, (f, meta) in enumerate(zip(files, metas)):
            names = meta.schema.to_arrow_schema().names
            if names != list(self.schema):
                raise StorageError(f"{f['url']}: columns {names} differ from {list(self.schema)} of the first file")
            rel = f["url"][len(base):].strip("/").replace("/", "__") or f["url"].rsplit("/", 1)[-1]
            for rg in range(meta.num_row_groups):
                rows = meta.row_group(rg).num_rows
                if rows:
                    self.shards.append(ShardInfo(rel, f["url"], rows, f["bytes"], "", f["tag"]))
                    self._where.append((k, rg))

    def open(self, i: int, buf: Any):
        import pyarrow as pa
        import pyarrow.parquet as pq

        shard = self.shards[i]
        try:
            table = pq.ParquetFile(pa.BufferReader(pa.py_buffer(buf))).read_row_group(self._where[i][1])
        except (pa.ArrowException, OSError) as exc:
            raise StorageError(f"{shard.url}: corrupt Parquet file: {exc}") from exc
        if table.num_rows != shard.num_samples:
            raise StorageError(f"{shard.url}: row group {self._where[i][1]} has {table.num_rows} rows, "
                               f"its footer says {shard.num_samples}")
        return table

    def sample(self, buf: Any, table, j: int) -> dict[str, Any]:
        row = _Batch(self.schema, 1, pin=False, shared=False)
        row.fill(buf, table, None, np.array([j]))
        out = {}
        for name, v in row.finish().items():
            spec = self.schema[name]
            if isinstance(v, torch.Tensor):
                out[name] = v[0].clone() if spec["kind"] not in SCALARS else v[0].item()
            else:
                out[name] = v[0]
        return out

    def batch(self, states: Sequence[Any], size: int, *, pin: bool, shared: bool) -> "_Batch":
        return _Batch(self.schema, size, pin=pin, shared=shared)


class _Batch:
    def __init__(self, schema: dict, size: int, *, pin: bool, shared: bool) -> None:
        self.schema, self.size, self.pin, self.shared = schema, size, pin, shared
        self._parts: list = []
        self._rows: list[np.ndarray] = []

    def fill(self, buf: Any, table, rows: np.ndarray | None, local: np.ndarray) -> None:
        import pyarrow as pa

        self._parts.append(table.take(pa.array(np.asarray(local, dtype=np.int64))))
        self._rows.append(np.arange(self.size) if rows is None else np.asarray(rows))

    def finish(self) -> dict[str, Any]:
        import pyarrow as pa

        table = self._parts[0] if len(self._parts) == 1 else pa.concat_tables(self._parts)
        placed = np.concatenate(self._rows)
        if not (placed == np.arange(self.size)).all():
            table = table.take(pa.array(np.argsort(placed, kind="stable")))
        out: dict[str, Any] = {}
        for name, spec in self.schema.items():
            v = column_values(table.column(name).combine_chunks(), spec, self.size, pin=self.pin,
                              shared=self.shared)
            out[name] = _stack(name, v, out=None) if isinstance(v, list) and spec["kind"] == "ndarray" else v
        return out
