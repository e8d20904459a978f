"""The state tree inside a checkpoint, the same for both checkpointers.

A state is ``{name: Stateful | dict | value}``. Each entry is *sharded* (its tensors go to
DCP, which plans, shards and reshards them) or *rank-local* (``RankLocal`` entries, and
every entry under DeepSpeed, whose engine holds the sharded part itself). Per rank, one
JSON file holds every non-tensor value of both kinds (``state``: the sharded entries with
placeholders for their tensors, ``local``: the rank-local ones) and, when rank-local entries
hold tensors, one safetensors file holds those. Loading puts the values back the same way
for both: Stateful entries get ``load_state_dict``, dicts are updated in place, anything
else is replaced; an entry the checkpoint lacks is a :class:`CheckpointMismatch`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from trainkit.checkpoint import _codec
from trainkit.checkpoint._store import CheckpointStore, record_of
from trainkit.checkpoint.state import RankLocal
from trainkit.errors import StorageError

RANK_FILE_FORMAT = "trainkit-rank-state/1"


class CheckpointMismatch(StorageError):
    """The checkpoint does not fit the state being loaded (a changed model or state tree)."""


def rank_json_name(rank: int) -> str:
    return f"rank_{rank:05d}.json"


def rank_tensors_name(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def _is_local(value: Any, sharded: bool) -> bool:
    return not sharded or isinstance(value, RankLocal)


def split_state(state: Mapping[str, Any], *, sharded: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """({name: state_dict} of the sharded entries, {name: state_dict} of the rank-local ones).
    ``sharded=False``: every entry is rank-local."""
    shared, local = {}, {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise TypeError(f"state keys must be str, got {k!r}")
        sd = v.state_dict() if isinstance(v, Stateful) else v
        (local if _is_local(v, sharded) else shared)[k] = sd
    return shared, local


@dataclass(frozen=True)
class RankState:
    """One rank's files, encoded when the save is taken (the values may change right after)
    and written later, possibly from the background thread."""

    blob: bytes
    tensors: bytes | None

    @classmethod
    def encode(cls, step: int, rank: int, world_size: int, shared_json: Any,
               local: Mapping[str, Any]) -> RankState:
        local_tree, local_tensors = _codec.split(local)
        blob = _codec.dumps({"format": RANK_FILE_FORMAT, "step": step, "rank": rank, "world_size": world_size,
                             "state": shared_json, "local": local_tree})
        st = None
        if local_tensors:
            from safetensors.torch import save as st_save

            st = st_save({k: t.detach().to("cpu", copy=True).contiguous() for k, t in local_tensors.items()})
        return cls(blob, st)

    def write(self, store: CheckpointStore, step: int, rank: int) -> dict[str, dict[str, Any]]:
        """Writes the files into the step; returns their manifest records."""
        records = {}
        for name, data in ((rank_json_name(rank), self.blob), (rank_tensors_name(rank), self.tensors)):
            if data is not None:
                store.put_bytes(store.file_path(step, name), data)
                records[name] = record_of(data)
        return records


def read_rank_state(store: CheckpointStore, step: int, manifest: dict[str, Any], rank: int, *,
                    verify: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(rank ``rank``'s JSON document, its rank-local tensors), checked against the manifest
    when ``verify``. Raises on anything unreadable; the caller agrees on it across ranks."""
    files = manifest["files"]
    name = rank_json_name(rank)
    doc = _codec.loads(store.read(step, name, files[name] if verify else None))
    if doc.get("format") != RANK_FILE_FORMAT:
        raise ValueError(f"{name}: unknown format")
    tensors: dict[str, torch.Tensor] = {}
    name = rank_tensors_name(rank)
    if name in files:
        from safetensors.torch import load as st_load

        tensors = st_load(store.read(step, name, files[name] if verify else None))
    return doc, tensors


def restore(state: dict[str, Any], doc: dict[str, Any], step: int, *, tensors: Mapping[str, torch.Tensor],
            local_tensors: Mapping[str, torch.Tensor], sharded: bool = True) -> None:
    """Puts the saved values back into ``state``, around ``tensors`` (the sharded ones, already
    loaded in place) and ``local_tensors``."""

    def tensor_of(key: str) -> torch.Tensor:
        if key not in tensors:
            raise CheckpointMismatch(f"checkpoint step {step} has tensor {key!r} that the state lacks")
        return tensors[key]

    saved = _codec.decode(doc["state"], tensor_of)
    saved_local = _codec.decode(doc.get("local") or {}, lambda key: local_tensors[key])
    for k, v in state.items():
        src = saved_local if _is_local(v, sharded) else saved
        if k not in src:
            raise CheckpointMismatch(f"checkpoint step {step} has no entry {k!r}; it has {sorted(src)}")
        if isinstance(v, Stateful):
            v.load_state_dict(src[k])
        elif isinstance(v, dict) and isinstance(src[k], dict):
            v.update(src[k])
        else:
            state[k] = src[k]
