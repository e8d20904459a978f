"""Warm starts: weights (and optionally the optimizer) from another run's checkpoint, a
``.safetensors`` file or a Hugging Face-style directory, into a live model of any strategy
and world size.

A run_dir source is read through DCP, so a checkpoint written by ``ddp`` on 2 workers loads
into ``fsdp`` on 3 (each rank reads only the shards it needs). A safetensors source is read
by every rank one tensor at a time (byte ranges, any fsspec URL), keeping only its part of
each, so a model built on ``meta`` and sharded never exists whole on a rank. Keys the model has and the source lacks (missing) and keys the source has and
the model lacks (unexpected) are listed in one message: with ``strict`` they are a
:class:`~trainkit.checkpoint.CheckpointMismatch`, without it a warning, and the keys both
have are loaded.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import torch

from trainkit import distributed, storage
from trainkit.checkpoint import _codec
from trainkit.checkpoint._tree import CheckpointMismatch, read_rank_state
from trainkit.errors import StorageError

log = logging.getLogger("trainkit.checkpoint")

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _exists(url: str) -> bool:
    fs, path = storage.filesystem(url)
    return bool(storage.retry(lambda: fs.exists(path), what=url))


def read_safetensors_weights(source: str) -> dict[str, torch.Tensor]:
    """Full tensors from ``x.safetensors`` or a directory holding ``model.safetensors`` or
    ``model.safetensors.index.json`` and its shards (Hugging Face's layout)."""
    from safetensors.torch import load as st_load

    out: dict[str, torch.Tensor] = {}
    for url in _safetensors_files(source):
        out.update(st_load(storage.read_bytes(url)))
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class _SafetensorsFile:
    """One safetensors file on any fsspec URL, read a tensor at a time by byte range: no
    mmap and no whole-file read, so a rank holds one tensor of it at a time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.path = storage.filesystem(url)
        size = int.from_bytes(self._range(0, 8), "little")
        try:
            head = json.loads(self._range(8, 8 + size))
        except ValueError as exc:
            raise StorageError(f"{url}: not a safetensors file ({exc})") from None
        head.pop("__metadata__", None)
        self.base = 8 + size
        self.entries: dict[str, dict[str, Any]] = head

    def _range(self, start: int, end: int) -> bytes:
        return storage.retry(lambda: self.fs.cat_file(self.path, start=start, end=end), what=self.url)

    def tensor(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        lo, hi = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        if hi == lo:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(bytearray(self._range(self.base + lo, self.base + hi)), dtype=dtype).reshape(e["shape"])


def _safetensors_files(source: str) -> list[str]:
    if source.endswith(".safetensors"):
        return [source]
    index_url = storage.join(source, INDEX)
    if _exists(index_url):
        try:
            files = sorted(set(json.loads(storage.read_bytes(index_url))["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{index_url}: not a safetensors index ({exc})") from None
        return [storage.join(source, name) for name in files]
    single = storage.join(source, SINGLE)
    if _exists(single):
        return [single]
    raise StorageError(f"{source}: no {SINGLE} or {INDEX} here")


def _stream_safetensors(model: torch.nn.Module, source: str, strict: bool) -> int:
    """Each tensor read whole, one at a time, and only this rank's part of it kept."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from trainkit.strategies.base import copy_full_

    where = {k: f for f in map(_SafetensorsFile, _safetensors_files(source)) for k in f.entries}
    own = get_model_state_dict(model)
    keep = _check_keys(source, set(own), set(where), strict)
    for key in own:
        if key in keep:
            copy_full_(own[key], where[key].tensor(key))
    return len(keep)


def is_safetensors_source(source: str) -> bool:
    """A file or Hugging Face directory, as opposed to a trainkit run_dir or checkpoint. A
    run_dir holds both (its checkpoints and its export): its checkpoints win, since they also
    hold the optimizer and name steps."""
    from trainkit.checkpoint.read import find_root, split_step

    if source.endswith(".safetensors"):
        return True
    url, at = split_step(source)
    if at is not None:
        return False
    try:
        find_root(url)
        return False
    except StorageError:
        return _exists(storage.join(source, INDEX)) or _exists(storage.join(source, SINGLE))


def _key_report(source: str, missing: list[str], unexpected: list[str]) -> str:
    def few(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"

    return f"warm start from {source}: missing (in the model, not in the source): {few(missing)}; " \
           f"unexpected (in the source, not in the model): {few(unexpected)}"


def _check_keys(source: str, model_keys: set[str], source_keys: set[str], strict: bool) -> set[str]:
    missing, unexpected = sorted(model_keys - source_keys), sorted(source_keys - model_keys)
    if missing or unexpected:
        msg = _key_report(source, missing, unexpected)
        if strict:
            raise CheckpointMismatch(msg + " (checkpoint.strict=false loads the keys both have)")
        warnings.warn(msg, stacklevel=3)
        log.warning(msg)
    return model_keys & source_keys


def warm_start(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, source: str, *,
               load_optimizer: bool = False, strict: bool = True, process_group=None,
               entry: str | None = None) -> str:
    """Loads ``source`` into ``model`` (and ``optimizer`` when ``load_optimizer``); all ranks
    call it. ``source``: a run_dir / checkpointer root / step directory (``@STEP``
    optional), a ``.safetensors`` file or a Hugging Face-style directory. Returns a line
    saying what was loaded."""
    if is_safetensors_source(source):
        if load_optimizer:
            raise StorageError(f"{source}: a safetensors source holds no optimizer state "
                               "(checkpoint.load_optimizer=false, or warm-start from a run_dir)")
        return f"warm start: {_stream_safetensors(model, source, strict)} tensors from {source}"
    return _from_checkpoint(model, optimizer, source, load_optimizer=load_optimizer, strict=strict,
                            group=process_group, entry=entry)


def _from_checkpoint(model, optimizer, source: str, *, load_optimizer: bool, strict: bool, group,
                     entry: str | None) -> str:
    import torch.distributed.checkpoint as dcp

    from trainkit.checkpoint.checkpointer import _quiet_dcp
    from trainkit.checkpoint.export import _model_optim_entry
    from trainkit.checkpoint.read import dcp_reader, locate
    from trainkit.checkpoint.state import ModelOptimState

    _quiet_dcp()
    found, problem = None, None
    if distributed.rank(group) == 0:
        try:
            loc = locate(source)
            doc, _ = read_rank_state(loc.store, loc.step, loc.manifest, 0)
            name = _model_optim_entry(doc["state"], entry)
            found = (loc.url, name, doc["state"][name])
        except Exception as exc:  # noqa: BLE001 - every rank raises the same below
            problem = f"{type(exc).__name__}: {exc}" if not isinstance(exc, StorageError) else str(exc)
    found, problem = distributed.broadcast_object((found, problem), group)
    if problem:
        raise StorageError(problem)
    step_url, name, saved_tree = found
    if load_optimizer and "optim" not in saved_tree:
        raise StorageError(f"{step_url}: entry {name!r} holds no optimizer state (checkpoint.load_optimizer=false)")
    target = ModelOptimState(model, optimizer if load_optimizer else None)
    tree = target.state_dict()
    _, tensors = _codec.split({name: tree})
    reader = dcp_reader(step_url)
    stored = {k for k, v in reader.read_metadata().state_dict_metadata.items() if hasattr(v, "size")}
    model_prefix = f"{name}.model."
    own_model = {k for k in tensors if k.startswith(model_prefix)}
    keep = _check_keys(step_url, {k[len(model_prefix):] for k in own_model},
                       {k[len(model_prefix):] for k in stored if k.startswith(model_prefix)}, strict)
    wanted = {k: t for k, t in tensors.items()
              if (k[len(model_prefix):] in keep if k.startswith(model_prefix) else k in stored)}
    dcp.load(wanted, storage_reader=reader, process_group=group, no_dist=not distributed.initialized())
    msd = {k: v for k, v in tree["model"].items() if k in keep}
    if load_optimizer:
        optim = _codec.decode(saved_tree["optim"], lambda key: wanted[key])
        target.load_state_dict({"model": msd, "optim": optim})
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, msd, options=StateDictOptions(strict=False))
    return f"warm start: {len(keep)} model tensors{' and the optimizer' if load_optimizer else ''} from {step_url}"
