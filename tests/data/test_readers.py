"""Every reader keeps the whole data contract on every store.

Readers: trainkit's shards, Parquet row groups, WebDataset tars with their offset index, mosaic
MDS (written by mosaicml-streaming's own MDSWriter). Stores: file://, moto's S3 server, Azurite.
For each (reader, store): exactly once over 2 ranks x 2 workers in one epoch, then a stop and a
resume on 3 x 1 and 1 x 3 (the accounting of test_order.py); the cache stays within its bound on
a dataset larger than it (remote stores: file:// is read in place); a corrupt file fails with its
URL; 503s, resets and truncated bodies from the fault proxy (remote stores) are retried and lose
or repeat nothing.

The default suite runs each kind of test on one store per reader, rotated (``DEFAULT``) so that
every (reader, store) pair gets at least one default test; the other combinations are slow-marked
(``--runslow`` runs all 40). The Arrow reader (Hugging Face ``save_to_disk``, written by the real
``datasets``) joined later: its 10 cases carry ``rotate("arrow-readers")``, so one of them runs
by default, a different one each day.
"""

from __future__ import annotations

import re

import pytest

from data_helpers import check_sample, expected_sequence, make_samples, run_loaders, write_mds
from test_cache import DirMonitor
from test_parquet import check_row, write_parquet
from test_wds import check as check_tar
from test_wds import write_tars
from trainkit import storage
from trainkit.data import Stream, write_shards
from trainkit.data.arrow import scan
from trainkit.data.wds import build_index
from trainkit.errors import StorageError

N = 240
READERS = ("trainkit", "parquet", "webdataset", "mds")
ROTATED = ("arrow",)  # one case of the group per default run (tests/conftest.py)
STORES = ("file", "s3", "az")
REMOTE = ("s3", "az")

DEFAULT = {
    "order": {"trainkit": "file", "parquet": "file", "webdataset": "az", "mds": "s3"},
    "corrupt": {"trainkit": "s3", "parquet": "az", "webdataset": "file", "mds": "file"},
    "cache": {"trainkit": "az", "parquet": "s3", "webdataset": "s3", "mds": "az"},
    "proxy": {"trainkit": "s3", "parquet": "az", "webdataset": "s3", "mds": "az"},
}


def _matrix(kind: str, stores=STORES):
    return [pytest.param(r, s, id=f"{r}-{s}", marks=() if DEFAULT[kind][r] == s else pytest.mark.slow)
            for r in READERS for s in stores] + [
        pytest.param(r, s, id=f"{r}-{s}", marks=pytest.mark.rotate("arrow-readers")) for r in ROTATED for s in stores]


def test_the_default_rotation_covers_every_pair():
    covered = {(r, s) for kind in DEFAULT.values() for r, s in kind.items()}
    assert covered == {(r, s) for r in READERS for s in STORES}


def _write(reader: str, url: str, tmp_path, *, small: bool = False) -> None:
    """240 samples; ``small``: in more, smaller files (the cache test)."""
    if reader == "trainkit":
        write_shards(make_samples(N), url, shard_bytes=1200 if small else 2500, workers=4)
    elif reader == "parquet":
        write_parquet(url, files=6 if small else 3, row_group=10 if small else 16)
    elif reader == "webdataset":
        write_tars(url, per_tar=10 if small else 20)
        build_index(url)
    elif reader == "arrow":
        _write_arrow(url, tmp_path, files=12 if small else 8)
    else:
        write_mds(url, make_samples(N), size_limit=1500 if small else 2500, tmp=tmp_path)


def _write_arrow(url: str, tmp_path, files: int) -> None:
    """``make_samples(N)`` saved by ``datasets``' own ``save_to_disk`` in ``files`` files (one
    record batch each), then uploaded as a user of a remote store would."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    feats = datasets.Features({"id": datasets.Value("int64"), "x": datasets.List(datasets.Value("float32"), length=8),
                               "y": datasets.List(datasets.Value("int16"), length=3),
                               "raw": datasets.Value("binary"), "name": datasets.Value("string")})
    rows = list(make_samples(N))
    local = tmp_path / "arrow-local"
    datasets.Dataset.from_dict({k: [r[k].tolist() if hasattr(r[k], "tolist") else r[k] for r in rows] for k in feats},
                               features=feats).save_to_disk(str(local), num_shards=files)
    fs, path = storage.filesystem(url)
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        target = f"{path}/{f.relative_to(local).as_posix()}"
        if storage.is_local(url):
            fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(target, f.read_bytes())


def _key_id(s: dict) -> dict:
    return {"id": int(s["__key__"].rsplit("/", 1)[1])}


def _row_id(s: dict) -> dict:  # Parquet's "tokens" vary in length: no batch of them stacks
    return {"id": s["id"]}


# trainkit and MDS batches go through the batched read (no transform)
TRANSFORM = {"trainkit": None, "parquet": _row_id, "webdataset": _key_id, "mds": None, "arrow": None}
CHECK = {"trainkit": check_sample, "parquet": check_row, "webdataset": check_tar, "mds": check_sample,
         "arrow": check_sample}


def _flip_a_byte(url: str) -> None:
    fs, path = storage.filesystem(url)
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def _zero_parquet_pages(url: str) -> None:
    """Same size, footer intact: only reading the pages finds it (Parquet has no file checksum)."""
    fs, path = storage.filesystem(url)
    data = bytearray(fs.cat_file(path))
    data[8:-200] = bytes(len(data) - 208)
    fs.pipe_file(path, bytes(data))


def _spoil_arrow_header(url: str) -> None:
    """The last record batch's message header, same size (an Arrow body has no checksum)."""
    fs, path = storage.filesystem(url)
    data = bytearray(fs.cat_file(path))
    off = scan(url, len(data))[1][-1][0]
    data[off + 8 : off + 40] = b"\xff" * 32
    fs.pipe_file(path, bytes(data))


CORRUPT = {"trainkit": _flip_a_byte, "parquet": _zero_parquet_pages, "webdataset": _flip_a_byte, "mds": _flip_a_byte,
           "arrow": _spoil_arrow_header}


@pytest.fixture
def store_url(request, tmp_path):
    """``store_url(store)``: a fresh dataset URL on that store."""

    def make(store: str) -> str:
        if store == "file":
            return "file://" + str(tmp_path / "data")
        return request.getfixturevalue(f"{store}_url") + "/data"

    return make


@pytest.fixture
def through_proxy(request, fault_proxy, storage_options, monkeypatch):
    """``through_proxy(store, **faults)``: a fault proxy in front of that store, the store's
    options pointed at it, and the client's own retries off (so the retrying shown is trainkit's)."""

    def make(store: str, **faults):
        if store == "s3":
            import s3fs

            monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # a class attribute, not an option
            proxy = fault_proxy(**faults)
            storage_options({"s3": {"endpoint_url": proxy.endpoint,
                                    "config_kwargs": {"retries": {"max_attempts": 1}}}})
            return proxy
        from azure.storage.blob.aio import ExponentialRetry

        plain = ExponentialRetry.__init__  # the async client's default policy; adlfs passes no retry options
        monkeypatch.setattr(ExponentialRetry, "__init__", lambda self, **kw: plain(self, **{**kw, "retry_total": 0}))
        server = request.getfixturevalue("azurite_server")
        proxy = fault_proxy(server.endpoint, **faults)
        storage_options({"az": server.options_for(proxy.endpoint)})
        return proxy

    return make


@pytest.mark.parametrize("reader,store", _matrix("order"))
def test_exactly_once_and_elastic_resume(reader, store, store_url, tmp_path):
    url = store_url(store)
    _write(reader, url, tmp_path)
    stream = Stream(url, cache_dir=str(tmp_path / "cache"), shuffle_window=3)
    assert stream.format == reader and len(stream) == N and stream.num_shards > 6
    for i in (0, 137, N - 1):
        CHECK[reader](stream[i], i)
    tf = TRANSFORM[reader]
    seq, state = run_loaders(stream, world=2, workers=2, batch_size=24, grad_accum=2, steps=10, seed=5, transform=tf)
    assert sorted(seq) == list(range(N)) and seq == expected_sequence(stream, 5, 0, N)
    assert state["position"] == N
    first, state = run_loaders(stream, world=2, workers=2, batch_size=12, steps=7, seed=11, transform=tf)
    assert state["position"] == 84
    for world, workers in ((3, 1), (1, 3)):
        rest, end = run_loaders(stream, world=world, workers=workers, batch_size=12, steps=13, seed=0, state=state,
                                transform=tf)
        assert end["position"] == N and end["seed"] == 11
        assert sorted(first + rest) == list(range(N)) and first + rest == expected_sequence(stream, 11, 0, N)


@pytest.mark.parametrize("reader,store", _matrix("cache", REMOTE))
def test_cache_stays_within_its_bound(reader, store, store_url, tmp_path):
    url = store_url(store)
    _write(reader, url, tmp_path, small=True)
    files = {s.local_name: s.bytes for s in Stream(url, cache_dir=str(tmp_path / "probe"), prefetch=0).shards}
    bound = 2 * max(files.values()) + max(files.values()) // 2
    assert sum(files.values()) > 2 * bound, files  # the dataset does not fit
    stream = Stream(url, cache_dir=str(tmp_path / "cache"), cache_bytes=bound, shuffle_window=2, prefetch=2)
    with DirMonitor(stream.cache_dir) as mon:
        seq, _ = run_loaders(stream, world=1, workers=2, batch_size=20, steps=12, seed=3, transform=TRANSFORM[reader])
    assert sorted(seq) == list(range(N))
    assert mon.samples > 10 and 0 < mon.max <= bound, (mon.max, bound)


@pytest.mark.parametrize("reader,store", _matrix("corrupt"))
def test_a_corrupt_file_fails_with_its_url(reader, store, store_url, tmp_path):
    url = store_url(store)
    _write(reader, url, tmp_path)
    stream = Stream(url, cache_dir=str(tmp_path / "cache"), prefetch=0)
    bad = stream.shards[-1].url
    assert stream.shards[0].url != bad
    CORRUPT[reader](bad)
    CHECK[reader](stream[0], 0)  # the other files still read
    with pytest.raises(StorageError, match=rf"^{re.escape(bad)}: corrupt"):
        stream[N - 1]


def _faults(n: int, method: str, path: str) -> str | None:
    return "503" if n % 5 == 1 else "reset" if n % 7 == 3 else "reset_mid" if n % 11 == 5 else None


@pytest.mark.parametrize("reader,store", _matrix("proxy", REMOTE))
def test_through_the_fault_proxy(reader, store, store_url, through_proxy, tmp_path):
    url = store_url(store)
    _write(reader, url, tmp_path)  # straight to the store
    proxy = through_proxy(store, schedule=_faults, latency=0.01, methods=["GET", "HEAD"])
    stream = Stream(url, cache_dir=str(tmp_path / "cache"), shuffle_window=2)
    tf = TRANSFORM[reader]
    # in-process readers: a DataLoader worker forked while the in-process proxy holds a connection
    # shares its socket, and the proxy's resets then reach the client only at its read timeout
    first, state = run_loaders(stream, world=2, workers=0, batch_size=24, steps=4, seed=6, transform=tf)
    rest, end = run_loaders(stream, world=1, workers=0, batch_size=24, steps=6, seed=6, state=state, transform=tf)
    assert end["position"] == N and first + rest == expected_sequence(stream, 6, 0, N)
    assert sorted(first + rest) == list(range(N))
    assert proxy.counts["503"] > 0 and proxy.counts["reset"] > 0, proxy.counts
