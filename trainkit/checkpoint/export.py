"""Unsharded exports: safetensors from a live model (all ranks), and a committed checkpoint
as Hugging Face safetensors, a torch file or an Accelerate state directory (one process)."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import torch

from trainkit import storage
from trainkit import distributed
from trainkit.errors import ConfigError, StorageError
from trainkit.rundir import EXPORT as EXPORT_FILE

log = logging.getLogger("trainkit.checkpoint")

INDEX = "model.safetensors.index.json"


def _dedup_storage(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): give each its own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in sd.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen or not t.is_contiguous() or t.storage_offset() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone().contiguous()
        else:
            seen.add(key)
        out[k] = t
    return out


def export_safetensors(model: torch.nn.Module, url: str, *, metadata: dict[str, str] | None = None) -> str:
    """Writes the full (gathered) model state dict as one safetensors file at ``url``.

    All ranks call it (FSDP2 gathers shards collectively); rank 0 writes. Works for plain,
    DDP and FSDP2 models; keys are the plain module's (no ``module.`` prefix).
    """
    from safetensors.torch import save as st_save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    err = None
    if distributed.rank() == 0:
        try:
            data = st_save(_dedup_storage(sd), metadata={"format": "pt", **(metadata or {})})
            fs, path = storage.filesystem(url)

            def put():
                parent = path.rsplit("/", 1)[0]
                if storage.is_local(url) and parent:
                    fs.makedirs(parent, exist_ok=True)
                fs.pipe_file(path, data)

            storage.retry(put, what=url)
        except Exception as exc:  # noqa: BLE001
            err = f"{type(exc).__name__}: {exc}"
    err = distributed.broadcast_object(err, None)
    if err:
        raise StorageError(f"export to {url} failed: {err}")
    return url


# -- the run's own exports: every rank writes its part, nothing is gathered in full --------

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _owners(sizes: list[int], world: int) -> list[int]:
    """Consecutive runs of keys per rank, about equal in bytes (a rank may get none)."""
    total = max(1, sum(sizes))
    out, used = [], 0
    for n in sizes:
        out.append(min(world - 1, used * world // total))
        used += n
    return out


def _header(entries: list[tuple[str, torch.dtype, list[int], int]], metadata: dict[str, str]) -> bytes:
    """A safetensors header for ``entries`` (name, dtype, shape, bytes) laid out in order."""
    head: dict[str, Any] = {"__metadata__": metadata}
    at = 0
    for name, dtype, shape, n in entries:
        head[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class _FileSink:
    """One output file written as a stream: in place (renamed when complete) on a local path,
    else through a local spool file uploaded with retries once complete, so a failed upload
    is retried without running the collectives that produced the bytes again."""

    def __init__(self, url: str) -> None:
        import os
        import tempfile

        self.url = url
        self.fs, self.path = storage.filesystem(url)
        self.local = storage.is_local(url)
        if self.local:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.tmp = f"{self.path}.partial"
        else:
            fd, self.tmp = tempfile.mkstemp(suffix=".safetensors")
            os.close(fd)
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit()/abort()

    def write(self, data: Any) -> None:
        self.f.write(data)

    def commit(self) -> None:
        import os

        self.f.close()
        if self.local:
            os.replace(self.tmp, self.path)
            return
        try:
            storage.retry(lambda: self.fs.put_file(self.tmp, self.path), what=self.url)
        finally:
            os.unlink(self.tmp)

    def abort(self) -> None:
        import contextlib
        import os

        self.f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def _host_bytes(t: torch.Tensor) -> Any:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def export_model(model: torch.nn.Module, url: str, *, metadata: dict[str, str] | None = None) -> list[str]:
    """The model's full weights in Hugging Face's safetensors layout; all ranks call it.

    ``url`` is the single-file name (``.../model.safetensors``). A sharded model (FSDP2
    DTensors) is split into one file per rank, written by that rank in parallel beside
    ``url`` (``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``); each
    tensor is all-gathered on its own and kept only by the rank that writes it, so no rank
    holds more than its own shard plus one tensor. A model every rank holds whole (single,
    DDP) is one file that rank 0 streams out tensor by tensor. Returns the URLs written.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    sd = {k: v for k, v in get_model_state_dict(model).items() if isinstance(v, torch.Tensor)}
    sharded = any(isinstance(v, DTensor) for v in sd.values())
    rank, world = distributed.rank(), distributed.world()
    keys = list(sd)
    sizes = [sd[k].numel() * sd[k].element_size() for k in keys]
    owner = _owners(sizes, world) if sharded else [0] * len(keys)
    files = sorted(set(owner))
    meta = {"format": "pt", **(metadata or {})}
    base = url.rsplit("/", 1)[0]
    if len(files) == 1:
        names = {files[0]: url}
    else:
        names = {r: storage.join(base, f"model-{i:05d}-of-{len(files):05d}.safetensors")
                 for i, r in enumerate(files, 1)}
    mine = [i for i, k in enumerate(keys) if owner[i] == rank]
    sink, err = None, None
    try:
        if mine:
            sink = _FileSink(names[rank])
            sink.write(_header([(keys[i], sd[keys[i]].dtype, list(sd[keys[i]].shape), sizes[i]) for i in mine],
                               meta))
        for i, k in enumerate(keys):
            t = sd[k]
            if isinstance(t, DTensor):
                t = t.full_tensor()  # a collective: every rank, in the same order
            if owner[i] == rank and err is None:
                try:
                    sink.write(_host_bytes(t))
                except Exception as exc:  # noqa: BLE001 - the collectives must go on
                    err = f"{type(exc).__name__}: {exc}"
            del t
        if sink is not None and err is None:
            sink.commit()
            sink = None
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        err = f"{type(exc).__name__}: {exc}"
    finally:
        if sink is not None:
            sink.abort()
    if err is None and rank == 0 and len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": dict(sorted((k, names[owner[i]].rsplit("/", 1)[-1]) for i, k in enumerate(keys)))}
        try:
            _put(storage.join(base, INDEX), json.dumps(index, indent=2).encode())
        except Exception as exc:  # noqa: BLE001
            err = f"{type(exc).__name__}: {exc}"
    errors = [e for e in distributed.all_gather_object(err) if e]
    if errors:
        raise StorageError(f"export to {base} failed: {errors[0]}")
    written = [names[r] for r in files]
    written = written if len(files) == 1 else [*written, storage.join(base, INDEX)]
    if rank == 0:
        _drop_other_layout(url, written)
    return written


def _drop_other_layout(url: str, written: list[str]) -> None:
    """Removes an earlier export's files beside ``url`` that this one did not rewrite (a run
    resumed on another world size or strategy), so the directory holds one layout."""
    fs, path = storage.filesystem(url)
    base = path.rsplit("/", 1)[0]
    keep = {storage.filesystem(w)[1] for w in written}
    found = storage.retry(lambda: fs.glob(f"{base}/model-*-of-*.safetensors"), what=url)
    stale = [p for p in [*found, f"{base}/{INDEX}", path] if p not in keep]
    for p in stale:
        if storage.retry(lambda p=p: fs.exists(p), what=url):
            storage.retry(lambda p=p: fs.rm(p), what=url)


# -- exports of a committed checkpoint, in one process ------------------------------------

EXPORT_FORMATS = ("safetensors", "torch", "accelerate")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"``, ``"1000000"`` → bytes (as Hugging Face's ``max_shard_size``)."""
    num = text.strip().upper().rstrip("S")
    unit = num.lstrip("0123456789.")
    try:
        value = float(num[: len(num) - len(unit)]) * _UNITS[unit.strip()]
    except (KeyError, ValueError):
        raise ConfigError(f"--max-shard-size: {text!r} is not a size (e.g. 5GB, 500MB, 2GiB)") from None
    if value < 1:
        raise ConfigError(f"--max-shard-size: {text!r} must be at least 1 byte")
    return int(value)


def _put(url: str, data: bytes) -> None:
    fs, path = storage.filesystem(url)

    def put() -> None:
        parent = path.rsplit("/", 1)[0]
        if storage.is_local(url) and parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)

    storage.retry(put, what=url)


def write_hf_safetensors(sd: dict[str, torch.Tensor], out: str, *, max_shard_size: int | None = None,
                         metadata: dict[str, str] | None = None) -> list[str]:
    """Hugging Face's layout: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
    shards of at most ``max_shard_size`` bytes (a larger tensor gets a shard of its own) plus
    ``model.safetensors.index.json``. Returns the URLs written."""
    from safetensors.torch import save as st_save

    sd = _dedup_storage(sd)
    groups: list[list[str]] = [[]]
    used = 0
    for key, t in sd.items():
        n = t.numel() * t.element_size()
        if max_shard_size and groups[-1] and used + n > max_shard_size:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += n
    meta = {"format": "pt", **(metadata or {})}
    if len(groups) == 1:
        url = storage.join(out, EXPORT_FILE)
        _put(url, st_save(sd, metadata=meta))
        return [url]
    written, weight_map = [], {}
    for i, keys in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        url = storage.join(out, name)
        _put(url, st_save({k: sd[k] for k in keys}, metadata=meta))
        weight_map.update(dict.fromkeys(keys, name))
        written.append(url)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    url = storage.join(out, INDEX)
    _put(url, json.dumps(index, indent=2).encode())
    return [*written, url]


def _model_optim_entry(tree: dict[str, Any], prefix: str | None) -> str:
    """The state entry holding ``{"model": ..., "optim": ...}`` (ModelOptimState's form)."""
    if prefix is not None:
        if prefix not in tree:
            raise ConfigError(f"--entry {prefix!r}: the checkpoint's entries are {sorted(tree)}")
        return prefix
    found = [k for k, v in tree.items() if isinstance(v, dict) and isinstance(v.get("model"), dict)]
    if len(found) != 1:
        raise ConfigError(f"cannot tell which entry is the model (entries with a 'model': {found}); "
                          f"name one with --entry (entries: {sorted(tree)})")
    return found[0]


def checkpoint_tree(url: str, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(the located step, its full shared state tree with every tensor unsharded), as the
    state entries' ``state_dict()`` returned them at the save, in one process."""
    from trainkit.checkpoint import _codec
    from trainkit.checkpoint._tree import read_rank_state
    from trainkit.checkpoint.read import load_for_export, locate

    loc = locate(url, step)
    if loc.kind != "dcp":
        raise StorageError(f"{loc.url}: a {loc.kind} checkpoint; export reads DCP checkpoints only")
    tensors = load_for_export(loc.url)
    doc, _ = read_rank_state(loc.store, loc.step, loc.manifest, 0)
    return loc, _codec.decode(doc["state"], lambda key: tensors[key])


def _indexed_optimizer(osd: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name (``get_optimizer_state_dict``) as
    ``torch.optim.Optimizer.state_dict()`` keys it: parameters numbered in group order."""
    ids: dict[str, int] = {}
    groups = []
    for g in osd.get("param_groups", []):
        groups.append({**g, "params": [ids.setdefault(p, len(ids)) for p in g["params"]]})
    return {"state": {ids[k]: v for k, v in osd.get("state", {}).items() if k in ids}, "param_groups": groups}


def export_checkpoint(url: str, out: str, to: str, *, step: int | None = None, max_shard_size: int | None = None,
                      entry: str | None = None) -> list[str]:
    """Writes a committed checkpoint's model (and, where the format holds one, its optimizer
    and LR scheduler) to ``out`` with no process group; returns the URLs written.

    ``safetensors``: Hugging Face's layout (model only). ``torch``: ``checkpoint.pt``, a
    ``torch.save`` of ``{"model": state_dict, "optimizer": state_dict keyed by parameter
    name}`` (``torch.load(weights_only=True)`` reads it). ``accelerate``: what
    ``Accelerator.save_state`` writes for one model and optimizer (``model.safetensors``,
    ``optimizer.bin``, ``scheduler.bin`` when the run had one), so ``load_state`` resumes an
    Accelerate loop from it; ``max_shard_size`` applies to ``safetensors`` only (Accelerate
    reads one unsharded model file)."""
    if to not in EXPORT_FORMATS:
        raise ConfigError(f"--to {to!r}: unknown format; choose one of {', '.join(EXPORT_FORMATS)}")
    loc, tree = checkpoint_tree(url, step)
    name = _model_optim_entry(tree, entry)
    model, optim = tree[name]["model"], tree[name].get("optim")
    meta = {"trainkit_checkpoint": loc.url}
    if to == "safetensors":
        return write_hf_safetensors(model, out, max_shard_size=max_shard_size, metadata=meta)
    buf = io.BytesIO()
    if to == "torch":
        torch.save({"model": model, "optimizer": optim}, buf)
        url_pt = storage.join(out, "checkpoint.pt")
        _put(url_pt, buf.getvalue())
        return [url_pt]
    written = write_hf_safetensors(model, out, metadata=meta)  # load_state reads one model.safetensors
    if optim is not None:
        torch.save(_indexed_optimizer(optim), buf)
        written.append(storage.join(out, "optimizer.bin"))
        _put(written[-1], buf.getvalue())
    sched = tree.get("scheduler")
    if isinstance(sched, dict):
        buf = io.BytesIO()
        torch.save(sched, buf)
        written.append(storage.join(out, "scheduler.bin"))
        _put(written[-1], buf.getvalue())
    return written
