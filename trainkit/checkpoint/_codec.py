"""Splitting a training-state tree into tensors (for DCP) and JSON (for everything else).

Nothing here pickles. Non-tensor leaves are written as JSON with a few tagged forms so the
tree comes back with the same Python types::

    tuple            {"__tk__": "tuple", "v": [...]}
    dict, non-str keys  {"__tk__": "dict", "v": [[key, value], ...]}
    bytes            {"__tk__": "bytes", "v": "<base64>"}
    torch.dtype      {"__tk__": "dtype", "v": "float32"}
    torch.device     {"__tk__": "device", "v": "cpu"}
    tensor           {"__tk__": "tensor", "v": "<key>"}   (the tensor itself lives elsewhere)

A tensor's key is its path in the tree joined with dots (``model.layer.weight``), which is
also how torch.distributed.checkpoint names flattened keys, so a trainkit checkpoint reads
like any other DCP checkpoint.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

TAG = "__tk__"
_SCALARS = (str, int, float, bool, type(None))


class StateTypeError(TypeError):
    """A value in the state that trainkit refuses to serialise (it would need pickle)."""


def _key_str(k: Any) -> str:
    return k if isinstance(k, str) else str(k)


def encode(tree: Any, on_tensor: Callable[[str, torch.Tensor], None], prefix: str = "") -> Any:
    """JSON-able form of ``tree``; each tensor is handed to ``on_tensor(key, tensor)``."""

    def enc(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            on_tensor(path, obj)
            return {TAG: "tensor", "v": path}
        if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int, float)):
            return obj
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) for k in obj) and TAG not in obj:
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in obj.items()}
            items = []
            for k, v in obj.items():
                if not isinstance(k, _SCALARS):
                    raise StateTypeError(f"state key {k!r} at {path or '<root>'!r}: only str/int/float/bool keys")
                items.append([k, enc(v, f"{path}.{_key_str(k)}" if path else _key_str(k))])
            return {TAG: "dict", "v": items}
        if isinstance(obj, (list, tuple)):
            vals = [enc(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
            return {TAG: "tuple", "v": vals} if isinstance(obj, tuple) else vals
        if isinstance(obj, (bytes, bytearray)):
            return {TAG: "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, torch.dtype):
            return {TAG: "dtype", "v": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {TAG: "device", "v": str(obj)}
        try:  # numpy scalars
            import numpy as np

            if isinstance(obj, np.generic):
                return enc(obj.item(), path)
            if isinstance(obj, np.ndarray):
                return enc(torch.from_numpy(obj.copy()), path)
        except ImportError:  # pragma: no cover
            pass
        raise StateTypeError(
            f"cannot checkpoint {type(obj).__name__} at {path or '<root>'!r}: trainkit saves tensors, "
            "str/int/float/bool/None, bytes, dtypes and lists/tuples/dicts of them (never pickle)"
        )

    return enc(tree, prefix)


def decode(data: Any, tensor: Callable[[str], torch.Tensor]) -> Any:
    """Inverse of :func:`encode`; ``tensor(key)`` supplies each tensor."""
    if isinstance(data, list):
        return [decode(v, tensor) for v in data]
    if isinstance(data, dict):
        tag = data.get(TAG)
        if tag is None:
            return {k: decode(v, tensor) for k, v in data.items()}
        v = data["v"]
        if tag == "tensor":
            return tensor(v)
        if tag == "tuple":
            return tuple(decode(x, tensor) for x in v)
        if tag == "dict":
            return {k: decode(x, tensor) for k, x in v}
        if tag == "bytes":
            return base64.b64decode(v)
        if tag == "dtype":
            dt = getattr(torch, v, None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"unknown dtype {v!r} in checkpoint")
            return dt
        if tag == "device":
            return torch.device(v)
        raise ValueError(f"unknown tag {tag!r} in checkpoint JSON")
    return data


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode()


def loads(data: bytes) -> Any:
    return json.loads(data.decode())


def split(tree: Mapping[str, Any], prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able tree with tensor placeholders, flat {key: tensor})."""
    tensors: dict[str, torch.Tensor] = {}

    def on_tensor(key: str, t: torch.Tensor) -> None:
        if key in tensors:
            raise StateTypeError(f"two tensors map to the same checkpoint key {key!r}; rename a state entry")
        tensors[key] = t

    return encode(tree, on_tensor, prefix), tensors
