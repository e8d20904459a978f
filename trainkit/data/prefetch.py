"""Batches on the GPU before the step asks for them: pinned host memory, one copy ahead.

A copy from pageable host memory makes the host wait for it; from pinned memory with
``non_blocking=True`` it is queued like a kernel. On a side stream it also overlaps the
current step's compute: while step ``k`` runs, batch ``k+1`` is already on its way, and the
training stream waits for it only when step ``k+1`` starts. Off CUDA there is nothing to
overlap and :func:`to_device` hands the batches on as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def map_leaves(fn: Callable[[Any], Any], batch: Any) -> Any:
    """``fn`` applied to every leaf of a batch of dicts, lists and tuples (the containers kept)."""
    if isinstance(batch, dict):
        return {k: map_leaves(fn, v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(map_leaves(fn, v) for v in batch)
    return fn(batch)


def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """``fn`` applied to every tensor in a batch of dicts, lists and tuples; the rest kept."""
    return map_leaves(lambda v: fn(v) if isinstance(v, torch.Tensor) else v, batch)


def pin(batch: Any) -> Any:
    """The batch in page-locked host memory, so a copy from it can be asynchronous."""
    return map_tensors(lambda t: t if t.is_pinned() else t.pin_memory(), batch)


def one_ahead(source: Iterable[T], stage: Callable[[T], Any], ready: Callable[[Any], Any]) -> Iterator[Any]:
    """Yields ``ready(stage(b))`` for every ``b`` of ``source``, in order, with ``stage`` of the
    next batch already called when one is handed out: the next copy starts before the
    consumer's step does. The source is read exactly one item ahead, never more."""
    it = iter(source)
    try:
        staged = stage(next(it))
    except StopIteration:
        return
    while True:
        current = ready(staged)
        try:
            staged = stage(next(it))
        except StopIteration:
            yield current
            return
        yield current


def to_device(source: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """``source``'s batches on ``device``, copied one ahead on a side stream (CUDA only;
    elsewhere the batches are passed through untouched)."""
    if device.type != "cuda":
        yield from source
        return
    copy_stream = torch.cuda.Stream(device)

    def stage(batch: Any) -> Any:
        with torch.cuda.stream(copy_stream):
            return map_tensors(lambda t: t.to(device, non_blocking=True), batch)

    def ready(batch: Any) -> Any:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(copy_stream)
        # Memory allocated on the copy stream but used on the compute stream: the allocator
        # must not hand it out again until the compute stream is done with it.
        map_tensors(lambda t: (t.record_stream(compute), t)[1], batch)
        return batch

    yield from one_ahead(source, stage, ready)
