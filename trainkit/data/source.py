"""``Source``: what a :class:`~trainkit.data.Stream` (and so the Loader) needs from a dataset
format, and trainkit's own shard format as one implementation.

A source gives the layout (``shards``: sample counts, sizes and checksums, in storage order;
the order, the windows and the cache work on these), the ``schema``, and reads from one
shard file once the cache has it locally and it is memory-mapped: ``open`` parses what the
shard needs (its header), ``sample`` decodes one sample, ``batch`` builds a micro-batch
part by part (one part per shard it touches). Several shards may live in one file (Parquet
row groups): they then share the file's cache entry (same ``local_name``).

``open_source(url, format)`` picks the reader: ``format`` (a key of ``READERS``: ``trainkit``,
``parquet``, ``arrow``, ``webdataset``, ``mds``), or what it finds at ``url`` (an ``index.json``
of trainkit shards, or of mosaic MDS shards; ``.parquet`` files; ``.arrow`` files, as Hugging
Face ``save_to_disk`` writes them; ``.tar`` files with their ``wds-index.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from trainkit import storage
from trainkit.data.batch import BatchBuilder
from trainkit.data.cache import ShardInfo
from trainkit.data.format import FORMAT, INDEX_NAME, READABLE_VERSIONS, ShardHeader, read_sample
from trainkit.errors import ConfigError, StorageError


class Batch(Protocol):
    def fill(self, buf: Any, state: Any, rows: np.ndarray | None, local: np.ndarray) -> None: ...

    def finish(self) -> dict[str, Any]: ...


class Source(Protocol):
    url: str
    format: str
    schema: dict[str, dict[str, str]]
    shards: list[ShardInfo]

    def open(self, i: int, buf: Any) -> Any:
        """What reading shard ``i`` needs, parsed from its mapped file ``buf`` (a StorageError
        naming the shard's URL if the file is not what the layout says)."""

    def sample(self, buf: Any, state: Any, j: int) -> dict[str, Any]:
        """Sample ``j`` of the shard (its index within the shard), decoded."""

    def batch(self, states: Sequence[Any], size: int, *, pin: bool, shared: bool) -> Batch:
        """A micro-batch of ``size`` samples over the shards with these ``states``: equal,
        value for value, to ``default_collate`` of the decoded samples."""


def read_index(url: str) -> dict:
    """The parsed index.json of the dataset at ``url`` (retried; a clear error if absent)."""
    index_url = storage.join(url, INDEX_NAME)
    try:
        raw = storage.read_bytes(index_url)
    except StorageError as exc:
        raise StorageError(f"no trainkit dataset at {url} ({exc})") from exc
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise StorageError(f"{index_url}: not valid JSON: {exc}") from exc
    if index.get("format") != FORMAT:
        raise StorageError(f"{index_url}: not a trainkit shard index (format={index.get('format')!r})")
    if index.get("version") not in READABLE_VERSIONS:
        raise StorageError(f"{index_url}: {FORMAT} version {index.get('version')!r} is newer than this trainkit "
                           f"reads ({', '.join(map(str, READABLE_VERSIONS))}); upgrade trainkit")
    return index


class TrainkitSource:
    """trainkit's shard format (:mod:`trainkit.data.format`, versions 1 and 2)."""

    format = "trainkit"

    def __init__(self, url: str, index: dict | None = None) -> None:
        self.url = url.rstrip("/")
        self.index = index if index is not None else read_index(self.url)
        self.schema: dict[str, dict[str, str]] = self.index["schema"]
        self.shards = [
            ShardInfo(s["name"], storage.join(self.url, s["name"]), int(s["samples"]), int(s["bytes"]), s["sha256"],
                      crc32c=s.get("crc32c", ""))
            for s in self.index["shards"]
        ]
        if sum(s.num_samples for s in self.shards) != int(self.index["num_samples"]):
            raise StorageError(f"{self.url}/{INDEX_NAME}: shard sample counts do not add up to num_samples")

    def open(self, i: int, buf: Any) -> ShardHeader:
        shard = self.shards[i]
        h = ShardHeader.read(lambda off, n: buf[off : off + n], shard.url)
        if h.num_samples != shard.num_samples:
            raise StorageError(f"{shard.url}: {h.num_samples} samples, index says {shard.num_samples}")
        return h

    def sample(self, buf: Any, state: ShardHeader, j: int) -> dict[str, Any]:
        return read_sample(buf, state, j)

    def batch(self, states: Sequence[ShardHeader], size: int, *, pin: bool, shared: bool) -> BatchBuilder:
        return BatchBuilder(self.schema, states, size, pin=pin, shared=shared)


def _trainkit(url: str) -> Source:
    return TrainkitSource(url)


def _parquet(url: str) -> Source:
    from trainkit.data.parquet import ParquetSource

    return ParquetSource(url)


def _arrow(url: str) -> Source:
    from trainkit.data.arrow import ArrowSource

    return ArrowSource(url)


def _webdataset(url: str) -> Source:
    from trainkit.data.wds import WebDatasetSource

    return WebDatasetSource(url)


def _mds(url: str) -> Source:
    from trainkit.data.mds import MDSSource

    return MDSSource(url)


# data.format -> the reader (a new format: its entry here, and its signature in _detect)
READERS: dict[str, Callable[[str], Source]] = {
    "trainkit": _trainkit, "parquet": _parquet, "arrow": _arrow, "webdataset": _webdataset, "mds": _mds,
}
FORMATS = tuple(READERS)


def open_source(url: str, format: str | None = None) -> Source:
    """The reader for the dataset at ``url``: ``format`` if given, else what is there."""
    url = url.rstrip("/")
    if format is not None and format not in READERS:
        raise ConfigError(f"data format {format!r} is not one of {', '.join(FORMATS)}")
    if format is not None:
        return READERS[format](url)
    try:
        return TrainkitSource(url)
    except StorageError as exc:
        if "not a trainkit shard index" in str(exc):
            from trainkit.data.mds import MDSSource, read_mds_index

            index = read_mds_index(url)  # None: index.json has MDS's shape neither
            if index is not None:
                return MDSSource(url, index)
            raise
        if "no trainkit dataset" not in str(exc):
            raise
        missing = exc
    found = _detect(url, _listing(url))
    if found is None:
        raise StorageError(f"no dataset at {url}: neither an index.json (trainkit, MDS), .parquet files, .arrow "
                           f"files (Hugging Face save_to_disk) nor .tar files ({missing}); pass data.format= to "
                           "choose the reader") from missing
    return READERS[found](url)


def _detect(url: str, names: list[str]) -> str | None:
    """The format whose files ``names`` (every path under ``url``) are."""
    if any(n.endswith(".parquet") for n in names):
        return "parquet"
    if any(n.endswith((".arrow", "/state.json", "/dataset_dict.json")) for n in names):
        return "arrow"  # a DatasetDict's root is refused there with the splits to choose from
    if any(n.endswith((".tar", "/wds-index.json")) for n in names):
        return "webdataset"  # without an index: refused with the command that builds it
    return None


def _listing(url: str) -> list[str]:
    """Every path under ``url`` (one listing, kept nowhere: later files must not look absent)."""
    fs, path = storage.filesystem(url)

    def find() -> list[str]:
        try:
            return list(fs.find(path))
        except FileNotFoundError:
            return []
        finally:
            fs.invalidate_cache(path)

    return storage.retry(find, what=url)
