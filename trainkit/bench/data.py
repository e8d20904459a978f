"""Data throughput benchmark: trainkit's Loader vs raw concurrent reads vs WebDataset.

``run(args)`` (wired as ``python -m trainkit.bench data``; also ``python -m trainkit.bench.data``):

* by default starts moto's S3 server (``--store gcs``: fake-gcs-server) on 127.0.0.1 and a :class:`~trainkit.testing.FaultProxy`
  (in its own process) in front of it adding ``--latency`` (20 ms) to every request, like a
  real store's time to first byte; or uses ``--url s3://bucket/prefix`` on your own store
  (options via ``FSSPEC_S3_*`` / ``trainkit.storage.configure``);
* per case (``--cases``), writes the same samples ``{"image": uint8 array, "label": int, "id":
  int}`` as trainkit shards, WebDataset tars and Parquet files of the same size:
  - ``small``: 20,000 images of 32x32x3 in 8 MB shards, batch 256, with 0 and 2 workers
    (what image and token models train on: the cost is per sample, not per byte);
  - ``large``: 4,096 samples of 32 KiB in 2 MB shards, batch 64, 2 workers (per byte);
* reads one epoch of each, cold (empty cache), every reader decoding to tensors and checking
  the content of every batch (ids, labels, probed pixels) inside its timed loop:
  - ``raw``: every trainkit shard object fetched whole with concurrent ``cat_file`` at
    trainkit's own concurrency (``Stream.prefetch``, which a rank's workers share) and parsed
    into one tensor per field per shard: the ceiling of the store + client at that concurrency;
  - ``trainkit``: ``Loader(Stream(url))`` (shuffled, default window), ``--workers`` workers;
  - ``trainkit on Parquet``: the same over Parquet files of the same size (one row group each);
  - ``webdataset``: ``wds.WebDataset`` over the tars, one stream per worker, opened with
    ``pipe:curl`` and a SigV4-signed GET (its fastest opener; through fsspec with ``--url`` or
    ``--store gcs``).

mosaicml-streaming is not measured: it is not installed in this project's environment.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from trainkit.bench import report

CASES: dict[str, dict[str, Any]] = {
    "small": {"samples": 20_000, "shape": [32, 32, 3], "shard_bytes": 8 << 20, "batch_size": 256, "workers": [0, 2]},
    "large": {"samples": 4096, "shape": [32 << 10], "shard_bytes": 2 << 20, "batch_size": 64, "workers": [2]},
}
LABELS = 10


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--url", default=None, help="existing bucket prefix to use instead of a local emulator")
    p.add_argument("--store", choices=["s3", "gcs"], default="s3",
                   help="the local emulator: moto's S3 (default) or fake-gcs-server")
    p.add_argument("--cases", default="small,large", help="comma-separated: small, large")
    p.add_argument("--samples", type=int, default=None, help="override the case's sample count")
    p.add_argument("--sample-bytes", type=int, default=None, help="override the case's sample size (1-D image)")
    p.add_argument("--shard-bytes", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--workers", default=None, help="comma-separated DataLoader worker counts (trainkit, WebDataset)")
    p.add_argument("--latency", type=float, default=0.02, help="seconds added per request by the proxy")
    p.add_argument("--prefetch", type=int, default=None,
                   help="trainkit Stream(prefetch=): concurrent downloads per rank (default: sized by Stream)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each reader; the best is kept")
    p.add_argument("--profile", default=None, help="write a cProfile of one in-process trainkit epoch here")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p


def _case(args: argparse.Namespace, name: str) -> dict[str, Any]:
    c = dict(CASES[name])
    if args.samples:
        c["samples"] = args.samples
    if args.sample_bytes:
        c["shape"] = [args.sample_bytes]
    if args.shard_bytes:
        c["shard_bytes"] = args.shard_bytes
    if args.batch_size:
        c["batch_size"] = args.batch_size
    if args.workers is not None:
        c["workers"] = [int(w) for w in str(args.workers).split(",")]
    return c


_BASE: dict[int, np.ndarray] = {}


def _base(n: int) -> np.ndarray:
    """Random bytes (incompressible, like real pixels: Parquet's codec must not shrink them)."""
    if n not in _BASE:
        _BASE[n] = np.random.default_rng(0).integers(0, 256, n, dtype=np.int64)
    return _BASE[n]


def _image(i: int, shape) -> np.ndarray:
    n = int(np.prod(shape))
    return ((_base(n) + i * 31) % 256).astype(np.uint8).reshape(shape)


def _samples(n: int, shape):
    for i in range(n):
        yield {"image": _image(i, shape), "label": i % LABELS, "id": i}


class Checker:
    """Checks decoded batches against the generator: every id once, labels, probed pixels."""

    def __init__(self, n: int, shape) -> None:
        size = int(np.prod(shape))
        self.n, self.probe = n, np.array(sorted({0, 1, size // 3, size // 2, size - 1}))
        self.base = _base(size)[self.probe]
        self.seen = np.zeros(n, dtype=np.int64)

    def __call__(self, image, label, ids) -> int:
        ids = np.asarray(ids)
        flat = np.asarray(image).reshape(len(ids), -1)
        want = (self.base[None, :] + ids[:, None] * 31) % 256
        if not (np.array_equal(flat[:, self.probe], want) and np.array_equal(np.asarray(label), ids % LABELS)):
            raise AssertionError(f"wrong content in a batch with ids {ids[:4].tolist()}...")
        self.seen[ids] += 1
        return len(ids)

    def done(self) -> None:
        if not (self.seen == 1).all():
            raise AssertionError(f"{int((self.seen != 1).sum())} samples not read exactly once")


def _write_wds(url: str, n: int, shape, shard_bytes: int, fs_for) -> list[str]:
    """Tar shards (WebDataset layout: <key>.img raw bytes, <key>.cls, <key>.id) of about ``shard_bytes``."""
    names: list[str] = []
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w")

    def flush() -> None:
        nonlocal buf, tar
        tar.close()
        name = f"wds-{len(names):06d}.tar"
        fs, path = fs_for(url + "/" + name)
        fs.pipe_file(path, buf.getvalue())
        names.append(name)
        buf = io.BytesIO()
        tar = tarfile.open(fileobj=buf, mode="w")

    for s in _samples(n, shape):
        key = f"{s['id']:08d}"
        for ext, data in (("img", s["image"].tobytes()), ("cls", str(s["label"]).encode()),
                          ("id", str(s["id"]).encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if buf.tell() >= shard_bytes:
            flush()
    if buf.tell() > 0:
        flush()
    else:
        tar.close()
    return [url + "/" + nm for nm in names]


def _write_parquet(url: str, n: int, shape, shard_bytes: int, fs_for) -> int:
    """The same samples as Parquet files of about ``shard_bytes`` (one row group each, snappy,
    the image as a fixed-size list of uint8); returns the bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = int(np.prod(shape))
    per_file = max(1, shard_bytes // (size + 16))
    total = 0
    for k, lo in enumerate(range(0, n, per_file)):
        ids = np.arange(lo, min(n, lo + per_file))
        images = np.stack([_image(int(i), [size]) for i in ids])
        table = pa.table({"image": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), size),
                          "label": pa.array(ids % LABELS), "id": pa.array(ids)})
        fs, path = fs_for(f"{url}/part-{k:05d}.parquet")
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, row_group_size=len(ids))
        total += fs.size(path)
    return total


def _parse_shard(data: bytes) -> dict[str, Any]:
    """A trainkit shard's bytes -> one tensor per (fixed-shape) field: the least a reader does."""
    import torch

    from trainkit.data.format import ShardHeader, fixed_column, torch_dtype

    h = ShardHeader.read(lambda off, n: data[off : off + n], "raw")
    out = {}
    for f, (name, spec) in enumerate(h.schema.items()):
        col = torch.from_numpy(fixed_column(data, h, f).copy())
        out[name] = col.view(torch_dtype(spec)).reshape(h.num_samples, *h.columns[f]["shape"])
    return out


def _raw(urls: list[str], threads: int, fs_for, check: Checker) -> float:
    def get(u: str) -> dict[str, Any]:
        fs, path = fs_for(u)
        return _parse_shard(fs.cat_file(path))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for b in pool.map(get, urls):
            check(b["image"], b["label"], b["id"])
    dt = time.perf_counter() - t0
    check.done()
    return dt


def _trainkit(url: str, case: dict, workers: int, cache_root: str, prefetch: int | None,
              check: Checker) -> float:
    from trainkit.data import Loader, Stream

    cache = tempfile.mkdtemp(dir=cache_root)
    kw = {} if prefetch is None else {"prefetch": prefetch}
    t0 = time.perf_counter()
    stream = Stream(url, cache_dir=cache, **kw)
    loader = Loader(stream, batch_size=case["batch_size"], rank=0, world_size=1, num_workers=workers)
    seen = 0
    it = iter(loader)
    while seen < case["samples"]:
        b = next(it)
        take = min(len(b["id"]), case["samples"] - seen)
        seen += check(b["image"][:take], b["label"][:take], b["id"][:take])
    dt = time.perf_counter() - t0
    check.done()
    it.close()
    stream.close()
    shutil.rmtree(cache, ignore_errors=True)
    return dt


def _decode_wds(sample):
    import torch

    img, cls, sid = sample
    return torch.from_numpy(np.frombuffer(img, dtype=np.uint8).copy()), int(cls), int(sid)


def _webdataset(urls: list[str], case: dict, workers: int, check: Checker) -> float:
    import fsspec
    import torch
    import webdataset as wds

    gopen = sys.modules["webdataset.gopen"]

    def fsspec_open(url, mode="rb", bufsize=8192, **kw):
        return fsspec.open(url, mode, **_options_for(url)).open()

    for scheme in ("s3", "gs", "memory"):
        gopen.gopen_schemes[scheme] = fsspec_open
    t0 = time.perf_counter()
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=wds.split_by_node)
          .shuffle(1000).to_tuple("img", "cls", "id").map(_decode_wds).batched(case["batch_size"], partial=True))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    shape = case["shape"]
    for img, cls, sid in dl:
        check(img.reshape(len(sid), *shape), cls, sid)
    dt = time.perf_counter() - t0
    check.done()
    return dt


def _options_for(url: str) -> dict[str, Any]:
    from trainkit import storage

    return storage.storage_options(url)


def _curl_urls(urls: list[str], endpoint: str) -> list[str]:
    """``pipe:curl`` URLs with a SigV4-signed GET (moto's dev credentials) for ``s3://`` URLs."""
    from trainkit.testing.servers import S3_ENV

    user = f"{S3_ENV['AWS_ACCESS_KEY_ID']}:{S3_ENV['AWS_SECRET_ACCESS_KEY']}"
    return [f"pipe:curl -s -f --aws-sigv4 aws:amz:us-east-1:s3 --user {user} {endpoint}/{u[len('s3://'):]}"
            for u in urls]


def _profile(url: str, case: dict, cache_root: str, prefetch: int | None, path: str) -> None:
    import cProfile

    prof = cProfile.Profile()
    check = Checker(case["samples"], case["shape"])
    prof.enable()
    _trainkit(url, case, 0, cache_root, prefetch, check)
    prof.disable()
    prof.dump_stats(path)


def run(args: argparse.Namespace | list[str] | None = None) -> dict[str, Any]:
    if not isinstance(args, argparse.Namespace):
        args = add_arguments(argparse.ArgumentParser(prog="python -m trainkit.bench data")).parse_args(args)
    from trainkit import storage
    from trainkit.data import Stream, write_shards
    from trainkit.testing import GCSServer, S3Server
    from trainkit.testing.faultproxy import ProxyProcess

    info = report.machine()
    saved_options = storage.configured()
    server = proxy = None
    work = tempfile.mkdtemp(prefix="trainkit-bench-data-")
    cases: dict[str, Any] = {}
    try:
        if args.url:
            base = args.url.rstrip("/") + f"/trainkit-bench-{int(time.time())}"
            where = args.url
        else:
            server = (GCSServer() if args.store == "gcs" else S3Server()).start()
            protocol = "gs" if args.store == "gcs" else "s3"
            base = server.bucket("trainkit-bench") + "/data"
            storage.configure({**saved_options, protocol: server.storage_options})
            where = f"{'fake-gcs-server' if protocol == 'gs' else 'moto S3'} on {server.endpoint}"
        written = {}
        for name in args.cases.split(","):
            case = _case(args, name)
            tk_url, wds_url = f"{base}/{name}/tk", f"{base}/{name}/wds"
            t0 = time.perf_counter()
            index = write_shards(_samples(case["samples"], case["shape"]), tk_url, shard_bytes=case["shard_bytes"])
            tars = _write_wds(wds_url, case["samples"], case["shape"], case["shard_bytes"], storage.filesystem)
            pq_bytes = _write_parquet(f"{base}/{name}/parquet", case["samples"], case["shape"], case["shard_bytes"],
                                      storage.filesystem)
            written[name] = (case, tk_url, index, tars, pq_bytes, time.perf_counter() - t0)
        endpoint = None
        if server is not None:
            proxy = ProxyProcess(server.endpoint, latency=args.latency)
            endpoint = proxy.endpoint if protocol == "s3" else None  # pipe:curl signs for S3 only
            storage.configure({**saved_options, protocol: server.options_for(proxy.endpoint)})
            where += f" via a proxy adding {args.latency * 1000:.0f} ms per request"
        for name, (case, tk_url, index, tars, pq_bytes, t_write) in written.items():
            probe = Stream(tk_url, cache_dir=work, **({} if args.prefetch is None else {"prefetch": args.prefetch}))
            per_process = probe.prefetch
            shard_urls = [s.url for s in probe.shards]
            probe.close()
            wds_urls = _curl_urls(tars, endpoint) if endpoint else tars
            wds_bytes = 0
            for u in tars:
                fs, path = storage.filesystem(u)
                wds_bytes += fs.size(path)
            tk_bytes, n = index["total_bytes"], case["samples"]
            results: dict[str, dict[str, float]] = {}
            ratios: dict[str, float] = {}

            def best(label: str, fn, nbytes: int) -> float:
                dt = min(fn() for _ in range(max(1, args.repeat)))
                results[label] = {"seconds": dt, "samples_per_s": n / dt, "mb_per_s": nbytes / dt / 1e6}
                return n / dt

            threads = max(1, per_process)
            raw = best(f"raw cat_file x{threads} + parse", lambda: _raw(
                shard_urls, threads, storage.filesystem, Checker(n, case["shape"])), tk_bytes)
            for w in case["workers"]:
                tk = best(f"trainkit ({w} workers)", lambda: _trainkit(
                    tk_url, case, w, work, args.prefetch, Checker(n, case["shape"])), tk_bytes)
                wd = best(f"webdataset ({w} workers, {'pipe:curl' if endpoint else 'fsspec'})", lambda: _webdataset(
                    wds_urls, case, w, Checker(n, case["shape"])), wds_bytes)
                pq_rate = best(f"trainkit on Parquet ({w} workers)", lambda: _trainkit(
                    f"{base}/{name}/parquet", case, w, work, args.prefetch, Checker(n, case["shape"])), pq_bytes)
                ratios[f"{w} workers: trainkit/raw"] = tk / raw
                ratios[f"{w} workers: trainkit/webdataset"] = tk / wd
                ratios[f"{w} workers: trainkit on Parquet/trainkit"] = pq_rate / tk
            if args.profile:
                _profile(tk_url, case, work, args.prefetch, f"{args.profile}.{name}")
            cases[name] = {
                "dataset": {"samples": n, "shape": case["shape"], "shards": index["num_shards"],
                            "shard_bytes": case["shard_bytes"], "batch_size": case["batch_size"],
                            "trainkit_bytes": tk_bytes, "wds_bytes": wds_bytes, "parquet_bytes": pq_bytes,
                            "write_seconds": t_write,
                            "downloads": per_process},
                "results": results, "ratios": ratios,
            }
        summary = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": report.describe(info),
            "git_commit": info["git_commit"],
            "load_avg": {"start": info["load_avg"], "end": report.load_avg()},
            "store": where,
            "cases": cases,
            "not_measured": "mosaicml-streaming (not installed in this environment)",
        }
        _print(summary)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
        return summary
    finally:
        if proxy is not None:
            proxy.stop()
        if server is not None:
            server.stop()
        storage.configure(saved_options)
        shutil.rmtree(work, ignore_errors=True)


def _print(s: dict[str, Any]) -> None:
    print(f"store:   {s['store']}")
    print(f"machine: {s['machine']}")
    for name, c in s["cases"].items():
        d = c["dataset"]
        print()
        print(f"[{name}] {d['samples']} samples of uint8{d['shape']} + label + id in {d['shards']} shards "
              f"({d['trainkit_bytes'] / 1e6:.1f} MB; tar {d['wds_bytes'] / 1e6:.1f} MB; Parquet "
              f"{d['parquet_bytes'] / 1e6:.1f} MB), batch {d['batch_size']}, "
              f"{d['downloads']} concurrent downloads")
        print(f"{'reader':<44} {'seconds':>8} {'samples/s':>10} {'MB/s':>8}")
        for label, r in c["results"].items():
            print(f"{label:<44} {r['seconds']:>8.2f} {r['samples_per_s']:>10.0f} {r['mb_per_s']:>8.1f}")
        for label, r in c["ratios"].items():
            print(f"  {label}: {r:.2f}x")
    print(f"not measured: {s['not_measured']}")


if __name__ == "__main__":
    run(sys.argv[1:])
