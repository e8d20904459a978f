"""``python -m trainkit.checkpoint list|inspect|verify|export``: a run's checkpoints on any URL.

RUN is a run_dir, its ``checkpoints/`` root or a ``step_*`` directory, on any fsspec URL
(local path, ``s3://``, ``gs://``; store options from the usual environment, e.g.
``FSSPEC_S3_ENDPOINT_URL``), optionally ``RUN@STEP`` (default: the newest committed step).
Needs no process group. Bad input (no such run, no such step, a torn step, an unknown
format) is one ``error:`` line and exit code 2; ``verify`` exits 1 when a file does not
match the manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from trainkit.errors import TrainkitError

TAG = "__tk__"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as every other bad input
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{seconds:.0f}s"


def cmd_list(url: str) -> int:
    from trainkit.checkpoint._store import CORRUPT_MANIFEST
    from trainkit.checkpoint.read import find_root

    store = find_root(url)
    rows = [("step", "status", "kind", "world", "bytes", "age")]
    now = time.time()
    for step in sorted(store.step_dirs()):
        try:
            man = store.read_manifest(step)
        except (FileNotFoundError, ValueError):
            sizes = store.list_sizes(step)
            status = "corrupt (de-committed)" if CORRUPT_MANIFEST in sizes else "torn"
            rows.append((str(step), status, "-", "-", _size(sum(sizes.values())), "-"))
            continue
        size = sum(int(r["size"]) for r in man["files"].values())
        rows.append((str(step), "committed", str(man.get("kind", "dcp")), str(man.get("world_size", "?")), _size(size),
                     _age(now - float(man.get("created_unix", now)))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"{store.root}")
    for r in rows:
        print("  ".join(c.rjust(w) if i in (0, 3, 4, 5) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return 0


def _outline(tree: Any) -> Any:
    """The non-tensor state with each tensor as ``"<tensor>"`` and subtrees of tensors only
    folded into one line (optimizer moments would otherwise fill the screen)."""
    if isinstance(tree, dict):
        if tree.get(TAG) == "tensor":
            return "<tensor>"
        if TAG in tree:
            return tree
        out = {k: _outline(v) for k, v in tree.items()}
        if out and all(v == "<tensor>" or (isinstance(v, str) and v.startswith("<") and v.endswith("tensors>"))
                       for v in out.values()):
            n = sum(1 if v == "<tensor>" else int(v[1:].split()[0]) for v in out.values())
            return f"<{n} tensors>"
        return out
    if isinstance(tree, list):
        return [_outline(v) for v in tree]
    return tree


def cmd_inspect(url: str) -> int:
    from trainkit.checkpoint._dcp_io import read_metadata, shard_format
    from trainkit.checkpoint._tree import read_rank_state
    from trainkit.checkpoint.read import locate

    loc = locate(url)
    man = loc.manifest
    print(f"{loc.url}: step {loc.step}, {loc.kind}, world size {man.get('world_size')}, "
          f"{_size(sum(int(r['size']) for r in man['files'].values()))} in {len(man['files'])} files")
    if loc.kind == "dcp":
        shards = shard_format(man, loc.url)
        md, _ = read_metadata(loc.store.fs, loc.store.step_path(loc.step), man["files"], what=loc.url, shards=shards)
        print(f"shards: {shards}")
        rows = [(k, "x".join(map(str, v.size)) or "scalar", str(v.properties.dtype).removeprefix("torch."),
                 str(len(v.chunks))) for k, v in sorted(md.state_dict_metadata.items()) if hasattr(v, "size")]
        rows.insert(0, ("key", "shape", "dtype", "shards"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    doc, local = read_rank_state(loc.store, loc.step, man, 0)
    print("non-tensor state (rank 0):")
    print(json.dumps({"state": _outline(doc.get("state")), "local": _outline(doc.get("local"))}, indent=1,
                     default=str))
    if local:
        print(f"rank-local tensors (rank 0): {', '.join(sorted(local))}")
    return 0


def cmd_verify(url: str) -> int:
    from trainkit import storage
    from trainkit.checkpoint._store import Crc32
    from trainkit.checkpoint.read import locate

    loc = locate(url)
    listed = loc.store.list_sizes(loc.step)
    bad = 0
    for name, rec in sorted(loc.manifest["files"].items()):
        path = loc.store.file_path(loc.step, name)
        problem = None
        if name not in listed:
            problem = "missing"
        elif listed[name] != rec["size"]:
            problem = f"{listed[name]} bytes, manifest says {rec['size']}"
        else:
            def crc_of(path: str = path) -> Crc32:
                crc = Crc32()
                with loc.store.fs.open(path, "rb") as f:
                    while chunk := f.read(16 << 20):
                        crc.update(chunk)
                return crc

            crc = storage.retry(crc_of, what=storage.join(loc.url, name))
            if crc.size != rec["size"] or crc.hexdigest() != rec["crc32"]:
                problem = f"checksum mismatch: {crc.size} bytes crc32 {crc.hexdigest()}, manifest says crc32 {rec['crc32']}"
        bad += problem is not None
        print(f"{'ok ' if problem is None else 'BAD'}  {name}  {rec['size']} bytes" + (f": {problem}" if problem else ""))
    print(f"{loc.url}: {'all ' + str(len(loc.manifest['files'])) + ' files match the manifest' if not bad else f'{bad} bad file(s)'}")
    return 1 if bad else 0


def cmd_export(url: str, to: str, out: str, max_shard_size: str | None, entry: str | None) -> int:
    from trainkit.checkpoint.export import export_checkpoint, parse_size

    limit = parse_size(max_shard_size) if max_shard_size else None
    for written in export_checkpoint(url, out, to, max_shard_size=limit, entry=entry):
        print(written)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m trainkit.checkpoint", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sub.add_parser("list", help="steps: committed or torn, world size, bytes, age").add_argument("run")
    sub.add_parser("inspect", help="keys, shapes, dtypes and the non-tensor state").add_argument("run")
    sub.add_parser("verify", help="check every file's size and CRC-32 against the manifest").add_argument("run")
    e = sub.add_parser("export", help="write the model (and optimizer) as safetensors, torch or accelerate")
    e.add_argument("run")
    e.add_argument("--to", required=True, help="safetensors | torch | accelerate")
    e.add_argument("--out", required=True, help="output directory (any fsspec URL)")
    e.add_argument("--max-shard-size", help="safetensors: shard the weights, e.g. 5GB (Hugging Face layout + index.json)")
    e.add_argument("--entry", help="the state entry holding the model (default: the one with a 'model')")
    a = p.parse_args(argv)
    try:
        if a.cmd == "list":
            return cmd_list(a.run)
        if a.cmd == "inspect":
            return cmd_inspect(a.run)
        if a.cmd == "verify":
            return cmd_verify(a.run)
        return cmd_export(a.run, a.to, a.out, a.max_shard_size, a.entry)
    except TrainkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
