"""Data throughput benchmark: trainkit's Loader vs raw concurrent fsspec reads vs WebDataset.

``run(args)`` (wired as ``python -m trainkit.bench data``; also ``python -m trainkit.bench.data``):

* by default starts moto's S3 server on 127.0.0.1 and a :class:`~trainkit.testing.FaultProxy`
  (in its own process) in front of it adding ``--latency`` (20 ms) to every request, like a
  real store's time to first byte; or uses ``--url s3://bucket/prefix`` on your own store (options via
  ``FSSPEC_S3_*`` / ``trainkit.storage.configure``);
* writes the same samples (``--samples`` x ``--sample-bytes`` random bytes plus an int label)
  as trainkit shards and as WebDataset tar shards of the same size;
* reads one epoch, each from a cold start (empty cache):
  - ``raw fsspec``: every trainkit shard object read whole with ``cat_file`` by
    ``--threads`` concurrent threads (default: trainkit's concurrency, ``--prefetch`` per
    process), nothing decoded: the ceiling of the store + client at that concurrency;
  - ``trainkit``: ``Loader(Stream(url))`` (shuffled, default window), batches of
    ``--batch-size``, ``--workers`` DataLoader workers;
  - ``webdataset``: ``wds.WebDataset(tar urls)`` opened through fsspec, same batch size,
    same ``--workers`` (WebDataset parallelises by workers: one stream per worker).

mosaicml-streaming is not measured: it cannot be installed next to torch 2.13 without
changing torch (its pins), which this project does not allow.
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


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--url", default=None, help="existing bucket prefix to use instead of a local moto server")
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--sample-bytes", type=int, default=32 << 10)
    p.add_argument("--shard-bytes", type=int, default=2 << 20)
    p.add_argument("--latency", type=float, default=0.02, help="seconds added per request by the proxy")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (trainkit and WebDataset)")
    p.add_argument("--wds-workers", type=int, default=None, help="WebDataset workers (default: --workers)")
    p.add_argument("--prefetch", type=int, default=4, help="trainkit Stream(prefetch=): concurrent downloads")
    p.add_argument("--threads", type=int, default=None,
                   help="raw fsspec concurrency (default: the same as trainkit's, --prefetch)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each reader; the best is kept")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p


def _samples(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        yield {"__key__": f"{i:08d}", "x": rng.integers(0, 256, size, dtype=np.uint8).tobytes(), "cls": i % 1000}


def _write_wds(url: str, n: int, size: int, shard_bytes: int, fs_for) -> list[str]:
    """Tar shards (WebDataset layout: <key>.x, <key>.cls) of about ``shard_bytes``."""
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

    for s in _samples(n, size):
        for ext, data in (("x", s["x"]), ("cls", str(s["cls"]).encode())):
            info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if buf.tell() >= shard_bytes:
            flush()
    if buf.tell() > 0:
        flush()
    else:
        tar.close()
    return [url + "/" + nm for nm in names]


def _raw(urls: list[str], threads: int, fs_for) -> tuple[float, int]:
    def get(u: str) -> int:
        fs, path = fs_for(u)
        return len(fs.cat_file(path))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(get, urls))
    return time.perf_counter() - t0, total


def _trainkit(url: str, n: int, batch: int, workers: int, cache_root: str, prefetch: int) -> tuple[float, int]:
    from trainkit.data import Loader, Stream

    cache = tempfile.mkdtemp(dir=cache_root)
    t0 = time.perf_counter()
    stream = Stream(url, cache_dir=cache, prefetch=prefetch)
    loader = Loader(stream, batch_size=batch, rank=0, world_size=1, num_workers=workers)
    seen = 0
    it = iter(loader)
    while seen < n:
        b = next(it)
        seen += len(b["cls"])
    dt = time.perf_counter() - t0
    it.close()
    stream.close()
    shutil.rmtree(cache, ignore_errors=True)
    return dt, seen


def _webdataset(urls: list[str], n: int, batch: int, workers: int) -> tuple[float, int]:
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
          .shuffle(1000).to_tuple("x", "cls").batched(batch, partial=True))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    seen = 0
    for xs, _cls in dl:
        seen += len(xs)
    return time.perf_counter() - t0, seen


def _options_for(url: str) -> dict[str, Any]:
    from trainkit import storage

    return storage.storage_options(url)


def run(args: argparse.Namespace | list[str] | None = None) -> dict[str, Any]:
    if not isinstance(args, argparse.Namespace):
        args = add_arguments(argparse.ArgumentParser(prog="python -m trainkit.bench data")).parse_args(args)
    from trainkit import storage
    from trainkit.data import Stream, write_shards
    from trainkit.testing import S3Server
    from trainkit.testing.faultproxy import ProxyProcess

    info = report.machine()
    saved_options = storage.configured()
    server = proxy = None
    work = tempfile.mkdtemp(prefix="trainkit-bench-data-")
    try:
        if args.url:
            base = args.url.rstrip("/") + f"/trainkit-bench-{int(time.time())}"
            where = args.url
        else:
            server = S3Server().start()
            base = server.bucket("trainkit-bench") + "/data"
            storage.configure({**saved_options, "s3": server.storage_options})
            where = f"moto S3 on {server.endpoint}"
        tk_url, wds_url = base + "/tk", base + "/wds"
        t0 = time.perf_counter()
        index = write_shards(_samples(args.samples, args.sample_bytes), tk_url, shard_bytes=args.shard_bytes)
        t_write = time.perf_counter() - t0
        tar_urls = _write_wds(wds_url, args.samples, args.sample_bytes, args.shard_bytes, storage.filesystem)
        if server is not None:
            proxy = ProxyProcess(server.endpoint, latency=args.latency)
            storage.configure({**saved_options, "s3": server.options_for(proxy.endpoint)})
            where += f" via a proxy adding {args.latency * 1000:.0f} ms per request"
        probe = Stream(tk_url, cache_dir=work, prefetch=args.prefetch)
        threads = args.threads or max(1, args.prefetch) * max(1, args.workers)
        shard_urls = [s.url for s in probe.shards]
        tk_bytes = index["total_bytes"]
        wds_bytes = 0
        for u in tar_urls:
            fs, path = storage.filesystem(u)
            wds_bytes += fs.size(path)
        wds_workers = args.workers if args.wds_workers is None else args.wds_workers
        results: dict[str, dict[str, float]] = {}

        def best(name: str, fn, nbytes: int, samples: int) -> None:
            times = []
            for _ in range(max(1, args.repeat)):
                dt, _count = fn()
                times.append(dt)
            dt = min(times)
            results[name] = {"seconds": dt, "samples_per_s": samples / dt, "mb_per_s": nbytes / dt / 1e6}

        best(f"raw fsspec cat_file x{threads} threads", lambda: _raw(shard_urls, threads, storage.filesystem),
             tk_bytes, args.samples)
        best(f"trainkit Loader ({args.workers} workers, prefetch {args.prefetch})",
             lambda: _trainkit(tk_url, args.samples, args.batch_size, args.workers, work, args.prefetch), tk_bytes, args.samples)
        best(f"webdataset ({wds_workers} workers)",
             lambda: _webdataset(tar_urls, args.samples, args.batch_size, wds_workers), wds_bytes, args.samples)
        names = list(results)
        raw, tk, wd = (results[k]["samples_per_s"] for k in names)
        summary = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": report.describe(info),
            "git_commit": info["git_commit"],
            "load_avg": {"start": info["load_avg"], "end": report.load_avg()},
            "store": where,
            "dataset": {"samples": args.samples, "sample_bytes": args.sample_bytes, "shards": index["num_shards"],
                        "trainkit_bytes": tk_bytes, "wds_bytes": wds_bytes, "write_seconds": t_write},
            "results": results,
            "ratios": {"trainkit_vs_raw": tk / raw, "trainkit_vs_webdataset": tk / wd},
            "not_measured": "mosaicml-streaming (not installable next to torch 2.13 without changing torch)",
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
    d = s["dataset"]
    print(f"store:   {s['store']}")
    print(f"data:    {d['samples']} samples x {d['sample_bytes']} B in {d['shards']} shards "
          f"({d['trainkit_bytes'] / 1e6:.1f} MB; tar {d['wds_bytes'] / 1e6:.1f} MB)")
    print(f"machine: {s['machine']}")
    print()
    print(f"{'reader':<40} {'seconds':>8} {'samples/s':>10} {'MB/s':>8}")
    for name, r in s["results"].items():
        print(f"{name:<40} {r['seconds']:>8.2f} {r['samples_per_s']:>10.0f} {r['mb_per_s']:>8.1f}")
    print()
    r = s["ratios"]
    print(f"trainkit / raw fsspec: {r['trainkit_vs_raw']:.2f}x (goal >= 0.9)   "
          f"trainkit / webdataset: {r['trainkit_vs_webdataset']:.2f}x (goal >= 1.5)")
    print(f"not measured: {s['not_measured']}")


if __name__ == "__main__":
    run(sys.argv[1:])
