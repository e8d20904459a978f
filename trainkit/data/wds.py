"""WebDataset tars with an offset index: random access, so the full order/resume/cache contract.

A tar is a stream format: reaching sample ``j`` means reading every member before it. Built
once, an index of member offsets removes that: ``python -m trainkit.data index URL`` reads
every ``.tar`` under ``URL`` (concurrently), groups members into samples the way WebDataset
does (consecutive members sharing a path up to the first dot of the file name:
``a/001.jpg`` + ``a/001.cls`` -> ``{"__key__": "a/001", "jpg": ..., "cls": ...}``) and writes
``URL/wds-index.json``, beside the shards, last. Each tar is then a shard: fetched whole into
the cache, checked against the size and sha256 in the index, and sliced at the indexed
offsets. Fields are ``bytes`` (decode them in a ``transform``), ``__key__`` is ``str``.
Without an index the dataset is refused with the command that builds it.
"""

from __future__ import annotations

import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from trainkit import storage
from trainkit.data.batch import default_collate
from trainkit.data.cache import ShardInfo, checksums
from trainkit.errors import ConfigError, StorageError

INDEX = "wds-index.json"
FORMAT = "trainkit-wds-index"


def tar_files(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    proto = url.split("://", 1)[0] + "://" if "://" in url else ""

    def listing() -> list[str]:
        try:
            return sorted(p for p in fs.find(path) if p.endswith(".tar"))
        except FileNotFoundError:
            return []
        finally:  # keep no listing: a file written later (the index) must not look absent
            fs.invalidate_cache(path)

    return [proto + p for p in storage.retry(listing, what=url)]


def _split_key(name: str) -> tuple[str, str]:
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def index_tar(url: str) -> dict[str, Any]:
    """One tar's entry of the index: its size, checksums and each sample's member offsets."""

    def read() -> bytes:
        fs, path = storage.filesystem(url)
        return fs.cat_file(path)

    data = storage.retry(read, what=url)
    import io

    samples: list[tuple[str, dict[str, list[int]]]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = [m.offset_data, m.size]
    except tarfile.TarError as exc:
        raise StorageError(f"{url}: not a readable tar file ({exc})") from exc
    fields = sorted(samples[0][1]) if samples else []
    for key, members in samples:
        if sorted(members) != fields:
            raise ConfigError(f"{url}: sample {key!r} has {sorted(members)}, the first sample has {fields}; "
                              "every sample needs the same extensions")
    return {"name": url.rsplit("/", 1)[-1], "url": url, "bytes": len(data), **checksums(data), "fields": fields,
            "keys": [k for k, _ in samples], "members": [[m[f] for f in fields] for _, m in samples]}


def build_index(url: str, workers: int = 8) -> dict[str, Any]:
    """Indexes every tar under ``url`` and writes ``url/wds-index.json`` (last)."""
    url = url.rstrip("/")
    tars = tar_files(url)
    if not tars:
        raise StorageError(f"no .tar files at {url}")
    with ThreadPoolExecutor(max(1, min(workers, len(tars)))) as pool:
        shards = list(pool.map(index_tar, tars))
    fields = shards[0]["fields"]
    for s in shards:
        if s["fields"] != fields:
            raise ConfigError(f"{s['url']}: fields {s['fields']} differ from {fields} of {shards[0]['url']}")
        s["name"] = s.pop("url")[len(url) + 1 :]
    index = {"format": FORMAT, "version": 1, "fields": fields, "num_samples": sum(len(s["keys"]) for s in shards),
             "shards": shards}
    target = storage.join(url, INDEX)

    def put() -> None:
        fs, path = storage.filesystem(target)
        fs.pipe_file(path, json.dumps(index, separators=(",", ":")).encode())

    storage.retry(put, what=target)
    return index


class WebDatasetSource:
    """Tars as shards, read at the offsets of ``wds-index.json``; see the module doc."""

    format = "webdataset"

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        target = storage.join(self.url, INDEX)
        try:
            raw = storage.read_bytes(target)
        except StorageError as exc:
            raise StorageError(f"{self.url}: no {INDEX}; build it once with `python -m trainkit.data index "
                               f"{self.url}`") from exc
        index = json.loads(raw)
        if index.get("format") != FORMAT:
            raise StorageError(f"{target}: not a trainkit WebDataset index")
        self.fields: list[str] = index["fields"]
        self.schema = {"__key__": {"kind": "str"}, **{f: {"kind": "bytes"} for f in self.fields}}
        self._keys = [s["keys"] for s in index["shards"]]
        self._members = [np.asarray(s["members"], dtype=np.int64).reshape(len(s["keys"]), len(self.fields), 2)
                         for s in index["shards"]]
        self.shards = [ShardInfo(s["name"].replace("/", "__"), storage.join(self.url, s["name"]), len(s["keys"]),
                                 int(s["bytes"]), s["sha256"], crc32c=s.get("crc32c", "")) for s in index["shards"]]

    def open(self, i: int, buf: Any) -> int:
        if len(buf) != self.shards[i].bytes:
            raise StorageError(f"{self.shards[i].url}: {len(buf)} bytes, the index says {self.shards[i].bytes}")
        return i

    def sample(self, buf: Any, i: int, j: int) -> dict[str, Any]:
        out: dict[str, Any] = {"__key__": self._keys[i][j]}
        for f, (off, size) in zip(self.fields, self._members[i][j]):
            out[f] = buf[off : off + size]
        return out

    def batch(self, states, size: int, *, pin: bool, shared: bool) -> "_Batch":
        return _Batch(self, size)


class _Batch:
    def __init__(self, source: WebDatasetSource, size: int) -> None:
        self.source, self.samples = source, [None] * size

    def fill(self, buf: Any, i: int, rows, local) -> None:
        for k, j in zip(range(len(self.samples)) if rows is None else rows, local):
            self.samples[k] = self.source.sample(buf, i, int(j))

    def finish(self) -> dict[str, Any]:
        return default_collate(self.samples)
