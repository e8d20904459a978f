"""Data throughput benchmark: trainkit's Loader vs raw concurrent reads, WebDataset and mosaic.

``run(args)`` (wired as ``python -m trainkit.bench data``; also ``python -m trainkit.bench.data``):

* by default starts moto's S3 server (``--store gcs``: fake-gcs-server) on 127.0.0.1 and a :class:`~trainkit.testing.FaultProxy`
  (in its own process) in front of it adding ``--latency`` (20 ms) to every request, like a
  real store's time to first byte; or uses ``--url s3://bucket/prefix`` on your own store
  (options via ``FSSPEC_S3_*`` / ``trainkit.storage.configure``);
* per case (``--cases``), writes the same samples ``{"image": uint8 array, "label": int, "id":
  int}`` as trainkit shards, WebDataset tars, Parquet files, Arrow files in the layout of
  Hugging Face ``save_to_disk`` (written with pyarrow: state.json, record batches of 1,000
  rows, the image as the nested lists ``Array3D`` stores) and mosaic MDS (its own
  ``MDSWriter``), files of about the same size:
  - ``small``: 20,000 images of 32x32x3 in 8 MB shards, batch 256, with 0 and 2 workers
    (what image and token models train on: the cost is per sample, not per byte);
  - ``large``: 4,096 samples of 32 KiB in 2 MB shards, batch 64, 2 workers (per byte);
* reads one epoch of each, cold (empty cache), every reader decoding to tensors and checking
  the content of every batch (ids, labels, probed pixels) inside its timed loop:
  - ``raw``: every trainkit shard object fetched whole with concurrent ``cat_file`` at
    trainkit's own concurrency (``Stream.prefetch``), one GET each (``start=0``: without a
    range s3fs 2026.9 sends a HEAD first), and parsed into one tensor per field per shard: the
    ceiling of the store + client at that concurrency;
  - ``trainkit``: ``Loader(Stream(url))`` (shuffled, default window), ``--workers`` workers,
    timed from opening the dataset; the same on the Parquet and on the Arrow files;
  - ``webdataset``: ``wds.WebDataset`` over the tars, one stream per worker, opened with
    ``pipe:curl`` and a SigV4-signed GET (its fastest opener; through fsspec with ``--url`` or
    ``--store gcs``);
  - ``mosaic``: mosaicml-streaming's ``StreamingDataset`` (shuffled) in a DataLoader, each run
    in a fresh forked process (it keeps process-wide shared-memory state); S3 only.
* ``--rounds`` rounds, each running every reader once, in alternating order (forward, then
  backward): on a shared machine the ratios of one round (readers run seconds apart) are what
  to compare; the summary gives each ratio's median over the rounds and every round's value.
"""

from __future__ import annotations

import argparse
import io
import json
import os
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
READERS = ("parquet", "arrow", "webdataset", "mosaic")  # besides raw and trainkit on its own format


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
    p.add_argument("--readers", default=",".join(READERS),
                   help="comma-separated, among: " + ", ".join(READERS) + " (raw and trainkit always run)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of every reader, in alternating order; ratios: the median over rounds")
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


def _hf_features(shape) -> dict[str, Any]:
    image = ({"feature": {"dtype": "uint8", "_type": "Value"}, "length": shape[0], "_type": "List"}
             if len(shape) == 1 else {"shape": list(shape), "dtype": "uint8", "_type": f"Array{len(shape)}D"})
    return {"image": image, "label": {"dtype": "int64", "_type": "Value"}, "id": {"dtype": "int64", "_type": "Value"}}


def _hf_images(images: np.ndarray, shape):
    """The image column as ``datasets`` stores it: ``List(uint8, length=n)`` as a fixed-size
    list; ``ArrayND`` as nested lists with the extension's name in the field metadata."""
    import pyarrow as pa

    flat = pa.array(images.reshape(-1))
    if len(shape) == 1:
        return pa.FixedSizeListArray.from_arrays(flat, shape[0]), None
    arr = flat
    for k in range(len(shape) - 1, -1, -1):
        step, count = shape[k], len(arr) // shape[k]
        arr = pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * step), arr)
    meta = {"ARROW:extension:name": f"datasets.features.features.Array{len(shape)}DExtensionType",
            "ARROW:extension:metadata": json.dumps([list(shape), "uint8"])}
    return arr, meta


def _write_arrow(url: str, n: int, shape, shard_bytes: int, fs_for) -> int:
    """The same samples in the layout of Hugging Face ``save_to_disk`` (files of about
    ``shard_bytes``, record batches of 1,000 rows, state.json, dataset_info.json), written with
    pyarrow; returns the bytes written."""
    import pyarrow as pa

    size = int(np.prod(shape))
    per_file = max(1, shard_bytes // (size + 16))
    starts = list(range(0, n, per_file))
    features = _hf_features(shape)
    total = 0
    names = []
    for k, lo in enumerate(starts):
        ids = np.arange(lo, min(n, lo + per_file))
        images, meta = _hf_images(np.stack([_image(int(i), [size]) for i in ids]), shape)
        table = pa.table({"image": images, "label": pa.array(ids % LABELS), "id": pa.array(ids)})
        image_field = table.schema.field(0).with_metadata(meta) if meta else table.schema.field(0)
        schema = pa.schema([image_field, *list(table.schema)[1:]],
                           metadata={"huggingface": json.dumps({"info": {"features": features}})})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as w:
            w.write_table(table.cast(schema), max_chunksize=1000)
        name = f"data-{k:05d}-of-{len(starts):05d}.arrow"
        names.append(name)
        fs, path = fs_for(f"{url}/{name}")
        fs.pipe_file(path, sink.getvalue().to_pybytes())
        total += fs.size(path)
    for name, doc in (("state.json", {"_data_files": [{"filename": nm} for nm in names], "_split": None}),
                      ("dataset_info.json", {"features": features})):
        fs, path = fs_for(f"{url}/{name}")
        fs.pipe_file(path, json.dumps(doc).encode())
    return total


def _streaming():
    """mosaicml-streaming's package (None if not installed). Its ``__init__`` imports its text,
    vision and dataloader modules, which import transformers and torchvision (not needed to
    read MDS): those names are stood in for when they are not installed."""
    import importlib.util
    import types

    if importlib.util.find_spec("streaming") is None:
        return None
    stand_ins = {"transformers.feature_extraction_utils": {"BatchFeature": type("BatchFeature", (dict,), {})},
                 "transformers.tokenization_utils_base": {"BatchEncoding": type("BatchEncoding", (dict,), {})},
                 "transformers.models.auto.tokenization_auto": {"AutoTokenizer": object},
                 "torchvision.datasets": {"CIFAR10": object, "VisionDataset": type("VisionDataset", (), {})},
                 "torchvision.transforms.functional": {"to_tensor": None}}
    stubbed: set[str] = set()
    for name, attrs in stand_ins.items():
        top = name.split(".")[0]
        if top not in stubbed and (top in sys.modules or importlib.util.find_spec(top) is not None):
            continue  # the real package
        stubbed.add(top)
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            sub = ".".join(parts[:k])
            if sub not in sys.modules:
                sys.modules[sub] = types.ModuleType(sub)
                sys.modules[sub].__path__ = []
                if k > 1:
                    setattr(sys.modules[".".join(parts[: k - 1])], parts[k - 1], sys.modules[sub])
        for attr, value in attrs.items():
            setattr(sys.modules[name], attr, value)
    import streaming

    return streaming


def _write_mds(url: str, n: int, shape, shard_bytes: int, fs_for, work: str) -> int:
    """The same samples as mosaic MDS (``MDSWriter``, ``size_limit=shard_bytes``), written
    locally and uploaded; returns the bytes written."""
    local = tempfile.mkdtemp(dir=work, prefix="mds-")
    columns = {"image": f"ndarray:uint8:{','.join(map(str, shape))}", "label": "int64", "id": "int64"}
    with _streaming().MDSWriter(out=local, columns=columns, size_limit=shard_bytes) as w:
        for s in _samples(n, shape):
            w.write(s)
    total = 0
    for name in sorted(os.listdir(local)):
        fs, path = fs_for(f"{url}/{name}")
        fs.put_file(os.path.join(local, name), path)
        total += os.path.getsize(os.path.join(local, name))
    shutil.rmtree(local, ignore_errors=True)
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
        # start=0: one GET (without a range, s3fs's cat_file first asks for the size: a HEAD)
        return _parse_shard(fs.cat_file(path, start=0))

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


def _mosaic_epoch(url: str, case: dict, workers: int, cache: str) -> float:
    import torch

    streaming = _streaming()
    check = Checker(case["samples"], case["shape"])
    t0 = time.perf_counter()
    ds = streaming.StreamingDataset(remote=url, local=cache, batch_size=case["batch_size"], shuffle=True,
                                    shuffle_seed=0)
    dl = torch.utils.data.DataLoader(ds, batch_size=case["batch_size"], num_workers=workers)
    for b in dl:
        check(b["image"], b["label"], b["id"])
    dt = time.perf_counter() - t0
    check.done()
    return dt


def _mosaic(url: str, case: dict, workers: int, cache_root: str, endpoint: str) -> float:
    """One mosaic epoch in a fresh forked process (its shared-memory state is per process);
    boto3 reaches the store through ``S3_ENDPOINT_URL``."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    cache = tempfile.mkdtemp(dir=cache_root, prefix="mosaic-")

    def child() -> None:
        os.environ["S3_ENDPOINT_URL"] = endpoint
        try:
            send.send(("ok", _mosaic_epoch(url, case, workers, cache)))
        except BaseException as exc:  # noqa: BLE001 - reported by the parent
            send.send(("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"))

    proc = ctx.Process(target=child, daemon=False)
    proc.start()
    try:
        if not recv.poll(600):
            raise RuntimeError("mosaic: no result after 600 s")
        status, value = recv.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        shutil.rmtree(cache, ignore_errors=True)
    if status != "ok":
        raise RuntimeError(f"mosaic: {value}")
    return value


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


def _ratios(times: dict[str, list[float]], workers: list[int], raw: str) -> dict[str, list[float]]:
    """Per round: trainkit against raw, against the faster of WebDataset and mosaic, and
    trainkit on Parquet / on Arrow against trainkit (rates, so a ratio > 1 is faster)."""
    out: dict[str, list[float]] = {}
    rounds = len(times[raw])
    for w in workers:
        tk = times[f"trainkit ({w} workers)"]
        others = [times[k] for k in times if k.startswith(("webdataset", "mosaic")) and f"({w} workers" in k]
        out[f"{w} workers: trainkit/raw"] = [times[raw][r] / tk[r] for r in range(rounds)]
        if others:
            out[f"{w} workers: trainkit/best of webdataset, mosaic"] = [
                min(o[r] for o in others) / tk[r] for r in range(rounds)]
        for fmt in ("Parquet", "Arrow"):
            key = f"trainkit on {fmt} ({w} workers)"
            if key in times:
                out[f"{w} workers: trainkit on {fmt}/trainkit"] = [tk[r] / times[key][r] for r in range(rounds)]
    return out


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
    picked = set(args.readers.split(","))
    mosaic = "mosaic" in picked and _streaming() is not None
    not_measured = [r for r in READERS if r not in picked]
    try:
        if args.url:
            base = args.url.rstrip("/") + f"/trainkit-bench-{int(time.time())}"
            where = args.url
            protocol = storage.protocol(args.url)
        else:
            server = (GCSServer() if args.store == "gcs" else S3Server()).start()
            protocol = "gs" if args.store == "gcs" else "s3"
            base = server.bucket("trainkit-bench") + "/data"
            storage.configure({**saved_options, protocol: server.storage_options})
            where = f"{'fake-gcs-server' if protocol == 'gs' else 'moto S3'} on {server.endpoint}"
        if "mosaic" in picked and not mosaic:
            not_measured.append("mosaicml-streaming (not installed)")
        elif mosaic and (protocol != "s3" or args.url):
            mosaic = False
            not_measured.append("mosaicml-streaming (read from the local S3 emulator only)")
        written = {}
        for name in args.cases.split(","):
            case = _case(args, name)
            urls = {k: f"{base}/{name}/{k}" for k in ("tk", "wds", "parquet", "arrow", "mds")}
            t0 = time.perf_counter()
            index = write_shards(_samples(case["samples"], case["shape"]), urls["tk"], shard_bytes=case["shard_bytes"])
            sizes = {"tk": index["total_bytes"]}
            tars = []
            if "webdataset" in picked:
                tars = _write_wds(urls["wds"], case["samples"], case["shape"], case["shard_bytes"], storage.filesystem)
                sizes["wds"] = 0
                for u in tars:
                    fs, path = storage.filesystem(u)
                    sizes["wds"] += fs.size(path)
            for key, writer in (("parquet", _write_parquet), ("arrow", _write_arrow)):
                if key in picked:
                    sizes[key] = writer(urls[key], case["samples"], case["shape"], case["shard_bytes"],
                                        storage.filesystem)
            if mosaic:
                sizes["mds"] = _write_mds(urls["mds"], case["samples"], case["shape"], case["shard_bytes"],
                                          storage.filesystem, work)
            written[name] = (case, urls, index, tars, sizes, time.perf_counter() - t0)
        endpoint = server.endpoint if server is not None else None
        if server is not None:
            proxy = ProxyProcess(server.endpoint, latency=args.latency)
            endpoint = proxy.endpoint
            storage.configure({**saved_options, protocol: server.options_for(proxy.endpoint)})
            where += f" via a proxy adding {args.latency * 1000:.0f} ms per request"
        for name, (case, urls, index, tars, sizes, t_write) in written.items():
            probe = Stream(urls["tk"], cache_dir=work, **({} if args.prefetch is None else {"prefetch": args.prefetch}))
            per_process = probe.prefetch
            shard_urls = [s.url for s in probe.shards]
            probe.close()
            curl = endpoint is not None and protocol == "s3"  # pipe:curl signs for S3 only
            wds_urls = _curl_urls(tars, endpoint) if curl else tars
            n, shape, threads = case["samples"], case["shape"], max(1, per_process)
            raw = f"raw cat_file x{threads} + parse"
            readers: list[tuple[str, Any, int]] = [
                (raw, lambda: _raw(shard_urls, threads, storage.filesystem, Checker(n, shape)), sizes["tk"])]
            for w in case["workers"]:
                for label, key in (("trainkit", "tk"), ("trainkit on Parquet", "parquet"),
                                   ("trainkit on Arrow", "arrow")):
                    if key in sizes:
                        readers.append((f"{label} ({w} workers)", lambda w=w, key=key: _trainkit(
                            urls[key], case, w, work, args.prefetch, Checker(n, shape)), sizes[key]))
                if "webdataset" in picked:
                    readers.append((f"webdataset ({w} workers, {'pipe:curl' if curl else 'fsspec'})",
                                    lambda w=w: _webdataset(wds_urls, case, w, Checker(n, shape)), sizes["wds"]))
                if mosaic:
                    readers.append((f"mosaic ({w} workers)", lambda w=w: _mosaic(
                        urls["mds"], case, w, work, endpoint), sizes["mds"]))
            times: dict[str, list[float]] = {label: [] for label, _, _ in readers}
            failed: dict[str, str] = {}
            for r in range(max(1, args.rounds)):
                for label, fn, _ in (readers if r % 2 == 0 else readers[::-1]):
                    if label in failed:
                        continue
                    try:
                        times[label].append(fn())
                    except RuntimeError as exc:  # a reader that cannot run here (mosaic): noted, not fatal
                        failed[label] = str(exc)
            for label in failed:
                del times[label]
            results = {label: {"seconds": min(times[label]), "samples_per_s": n / min(times[label]),
                               "mb_per_s": nbytes / min(times[label]) / 1e6, "rounds_s": times[label]}
                       for label, _, nbytes in readers if label in times}
            per_round = _ratios(times, case["workers"], raw)
            ratios = {k: float(np.median(v)) for k, v in per_round.items()}
            if args.profile:
                _profile(urls["tk"], case, work, args.prefetch, f"{args.profile}.{name}")
            cases[name] = {
                "dataset": {"samples": n, "shape": shape, "shards": index["num_shards"],
                            "shard_bytes": case["shard_bytes"], "batch_size": case["batch_size"],
                            "bytes": sizes, "write_seconds": t_write, "downloads": per_process},
                "results": results, "ratios": ratios, "ratios_per_round": per_round, "failed": failed,
            }
        summary = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": report.describe(info),
            "git_commit": info["git_commit"],
            "load_avg": {"start": info["load_avg"], "end": report.load_avg()},
            "store": where,
            "rounds": max(1, args.rounds),
            "cases": cases,
            "not_measured": "; ".join(not_measured) or "nothing",
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
    print(f"machine: {s['machine']}; load average {s['load_avg']['start']} -> {s['load_avg']['end']}")
    for name, c in s["cases"].items():
        d = c["dataset"]
        b = d["bytes"]
        print()
        print(f"[{name}] {d['samples']} samples of uint8{d['shape']} + label + id in {d['shards']} shards "
              f"({b['tk'] / 1e6:.1f} MB; " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in b.items() if k != "tk")
              + f"), batch {d['batch_size']}, {d['downloads']} concurrent downloads")
        print(f"{'reader (best of ' + str(s['rounds']) + ' rounds)':<44} {'seconds':>8} {'samples/s':>10} {'MB/s':>8}"
              "  every round (s)")
        for label, r in c["results"].items():
            print(f"{label:<44} {r['seconds']:>8.2f} {r['samples_per_s']:>10.0f} {r['mb_per_s']:>8.1f}  "
                  + " ".join(f"{t:.2f}" for t in r["rounds_s"]))
        for label, err in c["failed"].items():
            print(f"{label:<44} failed: {err}")
        print("ratios (median of the rounds; each round's):")
        for label, r in c["ratios"].items():
            print(f"  {label}: {r:.2f}x  (" + ", ".join(f"{v:.2f}" for v in c["ratios_per_round"][label]) + ")")
    print(f"not measured: {s['not_measured']}")


if __name__ == "__main__":
    run(sys.argv[1:])
