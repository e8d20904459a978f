"""``python -m trainkit.data write SRC_DIR URL`` / ``index URL`` / ``info URL``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from trainkit.errors import TrainkitError


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainkit.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="turn a folder of files into shards + index.json at URL")
    w.add_argument("src", help="folder; files sharing a name up to the first dot form one sample")
    w.add_argument("url", help="destination, any fsspec URL (s3://, gs://, file://, a path)")
    w.add_argument("--shard-bytes", default="64MiB", help="target shard size (default 64MiB)")
    w.add_argument("--workers", type=int, default=8, help="parallel uploads (default 8)")
    w.add_argument("--no-group", action="store_true", help="one file per sample: {__key__, data}")
    x = sub.add_parser("index", help="index the WebDataset tars at URL (random access for the Loader)")
    x.add_argument("url", help="prefix holding .tar shards; wds-index.json is written there")
    x.add_argument("--workers", type=int, default=8, help="tars read in parallel (default 8)")
    i = sub.add_parser("info", help="summarise the dataset at URL")
    i.add_argument("url")
    i.add_argument("--json", action="store_true", help="print the raw index")
    args = p.parse_args(argv)
    try:
        if args.cmd == "write":
            from trainkit.data.writer import folder_samples, write_shards

            t0 = time.perf_counter()
            index = write_shards(folder_samples(args.src, group=not args.no_group), args.url,
                                 shard_bytes=_parse_size(args.shard_bytes), workers=args.workers)
            dt = time.perf_counter() - t0
            print(f"wrote {index['num_samples']} samples in {index['num_shards']} shards "
                  f"({_size(index['total_bytes'])}) to {args.url} in {dt:.1f}s")
        elif args.cmd == "index":
            from trainkit.data.wds import build_index

            t0 = time.perf_counter()
            index = build_index(args.url, workers=args.workers)
            print(f"indexed {index['num_samples']} samples in {len(index['shards'])} tars "
                  f"(fields {', '.join(index['fields'])}) at {args.url} in {time.perf_counter() - t0:.1f}s")
        else:
            from trainkit.data.source import read_index

            index = read_index(args.url)
            if args.json:
                print(json.dumps(index, indent=1))
                return 0
            sizes = [s["bytes"] for s in index["shards"]]
            print(f"dataset   {args.url}")
            print(f"samples   {index['num_samples']}")
            print(f"shards    {len(sizes)}  (min {_size(min(sizes))}, max {_size(max(sizes))}, "
                  f"total {_size(sum(sizes))})")
            print("schema    " + ", ".join(
                f"{k}: {v['kind']}" + (f"[{v['dtype']}]" if "dtype" in v else "") for k, v in index["schema"].items()))
            print(f"checksum  {index.get('checksum', 'sha256')}; created {index.get('created', '?')}")
    except TrainkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
