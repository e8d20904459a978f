"""Helpers for the data tests (not a test module)."""

from __future__ import annotations

import numpy as np
import torch

from trainkit.data import Loader, Stream


def make_samples(n: int, dim: int = 8, payload: int = 0):
    """Samples whose fields all derive from their id, so a read can be checked."""
    for i in range(n):
        yield {
            "id": i,
            "x": torch.full((dim,), float(i)),
            "y": np.arange(3, dtype=np.int16) + i,
            "raw": bytes([i % 251]) * (payload + i % 7),
            "name": f"sample-{i}",
        }


def check_sample(s: dict, i: int, dim: int = 8, payload: int = 0) -> None:
    assert s["id"] == i
    assert torch.equal(s["x"], torch.full((dim,), float(i)))
    assert s["y"].dtype == torch.int16 and s["y"].tolist() == [i, i + 1, i + 2]
    assert s["raw"] == bytes([i % 251]) * (payload + i % 7)
    assert s["name"] == f"sample-{i}"


def expected_sequence(stream: Stream, seed: int, lo: int, hi: int) -> list[int]:
    return stream.ids_at(seed, lo, hi).tolist()


def run_loaders(stream: Stream, *, world: int, workers: int, batch_size: int, steps: int, grad_accum: int = 1,
                seed: int = 0, state: dict | None = None, check_state: bool = True, transform=None):
    """Simulates ``world`` ranks in this process for ``steps`` optimizer steps.

    Returns (ids in global position order, loader state after the last step). The global
    order is rebuilt from the contract: micro-step m of rank r covers
    P + (m*world + r)*micro ... + micro.
    """
    loaders = [Loader(stream, batch_size=batch_size, rank=r, world_size=world, grad_accum=grad_accum,
                      seed=seed, num_workers=workers, transform=transform) for r in range(world)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    its = [iter(ld) for ld in loaders]
    seq: list[int] = []
    try:
        for _ in range(steps):
            for _m in range(grad_accum):
                for it in its:
                    batch = next(it)
                    assert len(batch["id"]) == batch_size // (world * grad_accum)
                    seq.extend(batch["id"].tolist())
    finally:
        for it in its:
            it.close()
    states = [ld.state_dict() for ld in loaders]
    if check_state:
        assert all(s == states[0] for s in states), states
    return seq, states[0]
