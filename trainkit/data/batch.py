"""Micro-batches: the generic collate of decoded samples, and the batched read that skips it.

:class:`BatchBuilder` builds a batch straight from mapped shards: every fixed-shape field is one
tensor allocated for the whole batch (pinned, or in shared memory for a DataLoader worker,
so neither the pin nor the hand-over to the main process copies it again) and filled by one
numpy gather per shard from the mapped column. Var fields (bytes, str, arrays whose shape
varies within a shard) are decoded per sample and collated like :func:`default_collate`,
so a batch is the same as ``default_collate([decoded samples])``, value for value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from trainkit.data.format import SCALARS, ShardHeader, field_values, fixed_column, is_array, read_sample, torch_dtype
from trainkit.errors import ConfigError


def default_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks tensors (same shape required), turns ints/floats/bools into tensors, and keeps
    bytes/str as lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        v0 = vals[0]
        if isinstance(v0, torch.Tensor):
            out[key] = _stack(key, vals)
        elif isinstance(v0, np.ndarray):
            out[key] = torch.from_numpy(np.stack(vals))
        elif isinstance(v0, bool):
            out[key] = torch.tensor(vals, dtype=torch.bool)
        elif isinstance(v0, int):
            out[key] = torch.tensor(vals, dtype=torch.int64)
        elif isinstance(v0, float):
            out[key] = torch.tensor(vals, dtype=torch.float64)
        else:
            out[key] = vals
    return out


def _stack(key: str, vals: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    try:
        return torch.stack(vals, out=out)
    except RuntimeError as exc:
        raise ConfigError(
            f"field {key!r}: samples of different shapes cannot be stacked ({exc}); "
            "pass a transform that pads/crops, or a collate function"
        ) from exc


def empty(shape: Sequence[int], dtype: torch.dtype, *, pin: bool, shared: bool) -> torch.Tensor:
    t = torch.empty(tuple(shape), dtype=dtype, pin_memory=pin)
    return t.share_memory_() if shared else t


def collate_values(name: str, spec: Mapping[str, str], vals: list[Any], *, pin: bool, shared: bool) -> Any:
    """A field that is not one preallocated tensor, from its decoded values (one per sample), as
    ``default_collate`` would: numbers as one tensor, arrays stacked (into pinned/shared memory
    when they agree in shape), anything else as the list."""
    if spec["kind"] in SCALARS:
        return torch.tensor(vals, dtype=torch_dtype(spec))
    if is_array(spec):
        s0 = vals[0].shape
        out = empty([len(vals), *s0], torch_dtype(spec), pin=pin, shared=shared) if all(
            v.shape == s0 for v in vals) else None
        return _stack(name, vals, out=out)
    return vals


class BatchBuilder:
    """One micro-batch of ``size`` samples, filled shard by shard (version-1 shards: sample
    by sample, as they were written).

    ``headers``: those of every shard the batch touches, to decide per field whether the
    batch is one preallocated tensor (fixed-shape in all of them, same shape) or collated
    from decoded values.
    """

    def __init__(self, schema: Mapping[str, Mapping[str, str]], headers: Sequence[ShardHeader], size: int, *,
                 pin: bool = False, shared: bool = False) -> None:
        self.schema, self.size, self.pin, self.shared = schema, size, pin, shared
        self._fixed: dict[int, tuple[torch.Tensor, np.ndarray | None]] = {}
        self._vals: dict[int, list[Any]] = {}
        self._v1 = any(h.version == 1 for h in headers)  # whole samples: every field decoded
        for f, spec in enumerate(schema.values()):
            cols = [] if self._v1 else [h.columns[f] for h in headers]
            shape = cols[0].get("shape") if cols else None
            if cols and all(c["layout"] == "fixed" and c["shape"] == shape for c in cols):
                t = empty([size, *shape], torch_dtype(spec), pin=pin, shared=shared)
                dst = t.view(-1).view(torch.uint8).numpy().reshape(size, -1) if t.numel() else None
                self._fixed[f] = (t, dst)
            else:
                self._vals[f] = [None] * size

    def accepts(self, h: ShardHeader) -> bool:
        """Whether a shard the batch was not built for (``headers``) can fill part of it: every
        field taken as one tensor is fixed-shape there too, with the same shape."""
        if h.version == 1:
            return self._v1
        return not self._v1 and all(
            h.columns[f]["layout"] == "fixed" and list(h.columns[f]["shape"]) == list(t.shape[1:])
            for f, (t, _dst) in self._fixed.items())

    def fill(self, buf: Any, h: ShardHeader, rows: np.ndarray | None, local: np.ndarray) -> None:
        """The batch's samples ``local`` of the mapped shard ``buf``; ``rows``: where they go in
        the batch (None: all of it, in order)."""
        for f, (_t, dst) in self._fixed.items():
            if dst is None:
                continue
            src = fixed_column(buf, h, f)
            if rows is None:
                np.take(src, local, axis=0, out=dst)  # one copy: mapped file -> batch
            else:
                dst[rows] = src[local]
            del src  # a view of the mapping: it must not outlive the read
        where = range(self.size) if rows is None else rows
        if h.version == 1:
            names = list(self.schema)
            for k, j in zip(where, local):
                s = read_sample(buf, h, int(j))
                for f, vals in self._vals.items():
                    vals[k] = s[names[f]]
            return
        for f, vals in self._vals.items():
            for k, v in zip(where, field_values(buf, h, f, local)):
                vals[k] = v

    def finish(self) -> dict[str, Any]:
        return self.finish_split([0, self.size])[0]

    def finish_split(self, bounds: Sequence[int]) -> list[dict[str, Any]]:
        """The rows ``bounds[j]:bounds[j+1]`` as batch ``j``: views of the preallocated tensors,
        var fields collated per batch (as ``default_collate`` of that batch's samples)."""
        return split_batch(self.schema, bounds, self._fixed, self._vals, pin=self.pin, shared=self.shared)


def split_batch(schema: Mapping[str, Mapping[str, str]], bounds: Sequence[int],
                fixed: Mapping[int, tuple[torch.Tensor, Any]], vals: Mapping[int, list[Any]], *, pin: bool,
                shared: bool) -> list[dict[str, Any]]:
    """Batches from the rows of one filled builder (fixed fields: views; var: collated per batch)."""
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out: dict[str, Any] = {}
        for f, (name, spec) in enumerate(schema.items()):
            if f in fixed:
                t = fixed[f][0]
                out[name] = t if (a, b) == (0, len(t)) else t[a:b]
            else:
                out[name] = collate_values(name, spec, vals[f][a:b], pin=pin, shared=shared)
        outs.append(out)
    return outs
