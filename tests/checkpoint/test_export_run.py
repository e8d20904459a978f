"""The run's own exports: FSDP ranks write Hugging Face-style shards in parallel, at the end
and every checkpoint.export_every_steps; what they write is the checkpoint's weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from launching import GPT_TINY, launch
from trainkit.checkpoint import load_for_export
from trainkit.checkpoint.warm import read_safetensors_weights


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_on_2_exports_shards_at_the_end_and_every_n_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = launch(*GPT_TINY, "strategy=fsdp", "launcher.workers=2", "trainer.max_steps=4", "checkpoint.every_steps=2",
               "checkpoint.export_every_steps=2", f"run_dir={run}")
    assert r.returncode == 0, r.stderr
    for where, step in ((run, 4), (run / "exports" / "step_000000002", 2)):
        names = sorted(p.name for p in where.iterdir() if p.name.startswith("model"))
        assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                         "model.safetensors.index.json"], names
        index = json.loads((where / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(names[:2])
        for name in names[:2]:  # each shard opens with stock safetensors and holds full tensors
            with safe_open(str(where / name), "pt") as f:
                assert all(index["weight_map"][k] == name for k in f.keys())
        want = load_for_export(f"{run}@{step}", prefix="model_optim.model.")
        assert _same(read_safetensors_weights(str(where)), want), step
