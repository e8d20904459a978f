"""Stateful helpers for the training-state tree: model+optimizer, RNG streams, rank-local state."""

from __future__ import annotations

import base64
import random
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful


class RankLocal:
    """Marks a state entry as per-rank: saved to ``rank_<r>.json`` (+ ``.safetensors`` for
    tensors) by every rank instead of into the sharded DCP checkpoint, and restored on rank
    ``r`` from rank ``r % old_world_size``'s file.

    Wrap any Stateful or plain dict: ``state["loader"] = RankLocal(loader)``. Subclass it for
    Stateful objects that are always per-rank (``RNGState`` does).
    """

    def __init__(self, obj: Any = None) -> None:
        self.obj = obj

    def state_dict(self) -> Any:
        o = self.obj
        return o.state_dict() if isinstance(o, Stateful) else o

    def load_state_dict(self, sd: Any) -> None:
        o = self.obj
        if isinstance(o, Stateful):
            o.load_state_dict(sd)
        elif isinstance(o, dict):
            o.clear()
            o.update(sd)
        else:
            self.obj = sd


class ModelOptimState(Stateful):
    """Model (+ optimizer) through ``torch.distributed.checkpoint.state_dict``.

    Works for plain modules, DDP (keys without ``module.``) and FSDP2 (sharded DTensors); the
    optimizer state is keyed by parameter name, so it reshards with the model.
    ``state_dict()`` is ``{"model": ..., "optim": ...}``. Module buffers are returned as
    copies: they change during the forward pass (BatchNorm statistics, DDP's buffer
    broadcast), and a checkpoint whose host copy overlaps the next forward must not see that.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 options=None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": self._snapshot_buffers(get_model_state_dict(self.model, options=self.options))}
        msd, osd = get_state_dict(self.model, self.optimizer, options=self.options)
        return {"model": self._snapshot_buffers(msd), "optim": osd}

    def _snapshot_buffers(self, msd: dict[str, Any]) -> dict[str, Any]:
        buffers = {b.data_ptr() for b in self.model.buffers() if type(b) is torch.Tensor and b.numel()}
        for k, v in msd.items():
            if type(v) is torch.Tensor and v.numel() and v.data_ptr() in buffers:
                msd[k] = v.clone()
        return msd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        if self.optimizer is None:
            set_model_state_dict(self.model, sd["model"], options=self.options)
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"],
                           optim_state_dict=sd["optim"], options=self.options)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every RNG stream of this process, JSON-serialisable: python ``random``, NumPy's
    global generator, torch CPU and (when available) each CUDA device."""
    py_version, py_state, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "torch_cpu": _b64(torch.get_rng_state()),
    }
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(d: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned (CUDA only when present on both sides)."""
    py = d["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    torch.set_rng_state(_unb64(d["torch_cpu"]))
    if "numpy" in d:
        import numpy as np

        n = d["numpy"]
        np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "torch_cuda" in d and torch.cuda.is_available():
        states = [_unb64(s) for s in d["torch_cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:  # a different GPU count: this process's own device only
            torch.cuda.set_rng_state(states[torch.cuda.current_device() % len(states)])


class RNGState(RankLocal, Stateful):
    """A rank-local Stateful for :func:`rng_state` / :func:`set_rng_state`."""

    def __init__(self) -> None:
        super().__init__(None)

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_rng_state(sd)
