"""Writing datasets: samples (or a folder of files) -> shards + index.json at any fsspec URL."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trainkit import storage
from trainkit.data.cache import checksums
from trainkit.data.format import (FORMAT, INDEX_NAME, SHARD_SUFFIX, VERSION, Encoded, build_shard, encode_sample,
                                  encoded_size, schema_of)
from trainkit.errors import ConfigError


def _put(url: str, data: bytes) -> None:
    def put() -> None:
        fs, path = storage.filesystem(url)
        if storage.is_local(url):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fs.pipe_file(path, data)

    storage.retry(put, what=url)


class ShardWriter:
    """Packs samples into shards of about ``shard_bytes`` and uploads them with ``workers``
    threads; ``close()`` waits for the uploads, then writes index.json (last, so a reader
    never sees a dataset whose shards are not all there).

    ::

        with ShardWriter("s3://bucket/ds") as w:
            for sample in samples:
                w.write(sample)
        w.index  # the index dict
    """

    def __init__(self, url: str, *, shard_bytes: int = 64 << 20, workers: int = 8,
                 extra: Mapping[str, Any] | None = None) -> None:
        if shard_bytes < 1:
            raise ConfigError(f"shard_bytes must be positive, got {shard_bytes}")
        self.url = url.rstrip("/")
        self.shard_bytes = int(shard_bytes)
        self.schema: dict[str, dict[str, str]] | None = None
        self.extra = dict(extra or {})
        self._pool = ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix="trainkit-shard-writer")
        self._slots = threading.Semaphore(2 * max(1, int(workers)))  # bounds shards held in memory
        self._futures: list[Future] = []
        self._buf: list[Encoded] = []
        self._buf_bytes = 0
        self.num_samples = 0
        self.index: dict[str, Any] | None = None
        if storage.is_local(self.url):
            os.makedirs(storage.local_path(self.url), exist_ok=True)

    def write(self, sample: Mapping[str, Any]) -> None:
        if self.schema is None:
            self.schema = schema_of(sample)
        enc = encode_sample(sample, self.schema)
        size = encoded_size(enc, self.schema)
        if self._buf and self._buf_bytes + size > self.shard_bytes:
            self._flush()
        self._buf.append(enc)
        self._buf_bytes += size
        self.num_samples += 1

    def _flush(self) -> None:
        if not self._buf:
            return
        encoded, self._buf, self._buf_bytes = self._buf, [], 0
        n = len(self._futures)
        name = f"shard-{n:06d}{SHARD_SUFFIX}"
        self._slots.acquire()
        self._futures.append(self._pool.submit(self._upload, name, encoded))

    def _upload(self, name: str, encoded: list[Encoded]) -> dict[str, Any]:
        try:
            data = build_shard(encoded, self.schema)
            sums = checksums(data)
            _put(storage.join(self.url, name), data)
            return {"name": name, "samples": len(encoded), "bytes": len(data), **sums}
        finally:
            self._slots.release()

    def close(self) -> dict[str, Any]:
        if self.index is not None:
            return self.index
        try:
            self._flush()
            shards = [f.result() for f in self._futures]
        finally:
            self._pool.shutdown(wait=True)
        if not shards:
            raise ConfigError(f"no samples were written to {self.url}")
        self.index = {
            "format": FORMAT,
            "version": VERSION,
            "num_samples": self.num_samples,
            "num_shards": len(shards),
            "total_bytes": sum(s["bytes"] for s in shards),
            "schema": self.schema,
            "checksum": ", ".join(k for k in ("crc32c", "sha256") if k in shards[0]),
            "shards": shards,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.extra,
        }
        _put(storage.join(self.url, INDEX_NAME), json.dumps(self.index, indent=1).encode())
        return self.index

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # never write an index for a partial dataset
            self._pool.shutdown(wait=True, cancel_futures=True)


def write_shards(samples: Iterable[Mapping[str, Any]], url: str, *, shard_bytes: int = 64 << 20,
                 workers: int = 8) -> dict[str, Any]:
    """Writes ``samples`` (dicts of str -> tensor / ndarray / bytes / str / int / float) as
    shards of about ``shard_bytes`` plus ``index.json`` at ``url``; returns the index."""
    with ShardWriter(url, shard_bytes=shard_bytes, workers=workers) as w:
        for s in samples:
            w.write(s)
    return w.index


def folder_samples(src: str | os.PathLike, *, group: bool = True) -> Iterator[dict[str, Any]]:
    """Samples from a folder of files, WebDataset-style: files sharing a path up to the first
    dot of their name form one sample ``{"__key__": key, ext: bytes, ...}``; with
    ``group=False`` each file is ``{"__key__": relative path, "data": bytes}``. Sorted by key."""
    root = Path(src)
    if not root.is_dir():
        raise ConfigError(f"{src} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ConfigError(f"{src} holds no files")
    if not group:
        for p in files:
            yield {"__key__": str(p.relative_to(root)), "data": p.read_bytes()}
        return
    groups: dict[str, dict[str, Path]] = {}
    for p in files:
        rel = p.relative_to(root)
        stem, _, ext = rel.name.partition(".")
        key = str(rel.parent / stem) if str(rel.parent) != "." else stem
        groups.setdefault(key, {})[ext or "data"] = p
    fields = None
    for key in sorted(groups):
        g = groups[key]
        if fields is None:
            fields = sorted(g)
        elif sorted(g) != fields:
            raise ConfigError(
                f"{src}: sample {key!r} has files {sorted(g)}, the first sample has {fields}; "
                "every sample needs the same extensions (or use --no-group: one file per sample)"
            )
        yield {"__key__": key, **{ext: g[ext].read_bytes() for ext in fields}}
