"""Unsharded exports for serving: safetensors from a live model, tensors from a checkpoint."""

from __future__ import annotations

import logging

import torch
import torch.distributed.checkpoint as dcp

from trainkit import storage
from trainkit import distributed
from trainkit.checkpoint._dcp_io import METADATA_FILE, SafeFsspecReader, safe_load_metadata
from trainkit.checkpoint._store import MANIFEST, CheckpointStore
from trainkit.errors import StorageError

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


def _resolve_step_url(ckpt_url: str) -> str:
    store = CheckpointStore(ckpt_url)
    fs, path = store.fs, store.root_path
    store.invalidate(path)
    if storage.retry(lambda: fs.exists(f"{path}/{MANIFEST}") or fs.exists(f"{path}/{METADATA_FILE}"),
                     what=ckpt_url):
        return store.root
    step = store.valid_latest()
    if step is None:
        raise StorageError(f"{ckpt_url}: no committed checkpoint")
    return store.step_url(step)


def load_for_export(ckpt_url: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors of a sharded DCP checkpoint, unsharded, in this one process.

    ``ckpt_url`` is a step directory or a checkpointer root (then its newest committed
    step). ``prefix`` keeps only keys starting with it and strips it: ``"app.model."`` gives
    the plain model weights of ``state["app"] = ModelOptimState(...)``; ``""`` gives every
    tensor (optimizer state included). Needs no process group; reads the metadata with the
    allow-list unpickler and tensors with ``weights_only=True``.
    """
    from trainkit.checkpoint.checkpointer import _quiet_dcp

    _quiet_dcp()
    step_url = _resolve_step_url(ckpt_url)
    fs, path = storage.filesystem(step_url)
    raw = storage.retry(lambda: fs.cat_file(f"{path.rstrip('/')}/{METADATA_FILE}"), what=f"{step_url}/{METADATA_FILE}")
    md = safe_load_metadata(raw)
    sd: dict[str, torch.Tensor] = {}
    for k, v in md.state_dict_metadata.items():
        if not hasattr(v, "size") or not k.startswith(prefix):
            continue
        sd[k] = torch.empty(tuple(v.size), dtype=v.properties.dtype)
    dcp.load(sd, storage_reader=SafeFsspecReader(step_url, storage.storage_options(step_url)), no_dist=True)
    return {k[len(prefix):]: t for k, t in sd.items()}
