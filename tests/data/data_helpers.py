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


MDS_COLUMNS = {"id": "int64", "x": "ndarray:float32:8", "y": "ndarray:int16:3", "raw": "bytes", "name": "str"}


def mds_writer():
    """mosaicml-streaming's own ``MDSWriter``. ``streaming/__init__`` imports its dataloader and
    vision modules (transformers, torchvision: not installed, not needed to write), so its two
    package modules are stood in for while the writer's modules are imported, then removed:
    a later ``import streaming`` still runs the real ones."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    real = sys.modules.get("streaming")
    if real is not None and hasattr(real, "MDSWriter"):
        return real.MDSWriter
    root = Path(importlib.util.find_spec("streaming").origin).parent
    stand_ins = {}
    for name, path in (("streaming", root), ("streaming.base", root / "base")):
        if name not in sys.modules:
            stand_ins[name] = sys.modules[name] = types.ModuleType(name)
            stand_ins[name].__path__ = [str(path)]
    try:
        from streaming.base.format.mds.writer import MDSWriter
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
    return MDSWriter


def write_mds(url: str, samples, columns: dict[str, str] = MDS_COLUMNS, *, size_limit: int = 2500,
              compression: str | None = None, hashes: tuple[str, ...] = ("sha256",), tmp=None) -> str:
    """Writes ``samples`` with MDSWriter into a local folder, then uploads it to ``url`` (what a
    user of a remote store does); returns ``url``."""
    import os
    import tempfile

    from trainkit import storage

    local = url.removeprefix("file://") if storage.is_local(url) else tempfile.mkdtemp(dir=tmp, prefix="mds-")
    with mds_writer()(out=local, columns=columns, size_limit=size_limit, compression=compression,
                      hashes=list(hashes) or None) as w:
        for s in samples:
            w.write({k: s[k].numpy() if isinstance(s[k], torch.Tensor) else s[k] for k in columns})
    if not storage.is_local(url):
        fs, path = storage.filesystem(url)
        for name in sorted(os.listdir(local)):
            with open(os.path.join(local, name), "rb") as f:
                fs.pipe_file(f"{path}/{name}", f.read())
    return url
