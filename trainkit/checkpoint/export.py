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


# -- exports of a committed checkpoint, in one process ------------------------------------

EXPORT_FORMATS = ("safetensors", "torch", "accelerate")
INDEX = "model.safetensors.index.json"
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
