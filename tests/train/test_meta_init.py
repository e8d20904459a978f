"""trainer.meta_init: the model is built on ``meta`` and only materialised by the strategy
(fsdp: after sharding, each rank allocating its shard), with the weights of an eager build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launching import GPT_TINY, launch, launch_here, losses
from trainkit.checkpoint.warm import read_safetensors_weights
from trainkit.distributed import DistInfo
from trainkit.strategies.base import Strategy, StrategyOptions, StepSettings
from trainkit.tasks.gpt import GPT, GPTConfig


@pytest.mark.rotate("e2e-long")
def test_fsdp_meta_init_trains_exactly_as_eager_init(tmp_path: Path) -> None:
    runs = {}
    for mode in ("false", "true"):
        runs[mode] = tmp_path / f"meta-{mode}"
        r = launch(*GPT_TINY, "strategy=fsdp", "launcher.workers=2", "trainer.max_steps=2",
                   f"trainer.meta_init={mode}", "checkpoint.enabled=false", f"run_dir={runs[mode]}")
        assert r.returncode == 0, r.stderr
    eager, meta = (read_safetensors_weights(str(runs[m])) for m in ("false", "true"))
    assert eager.keys() == meta.keys() and all(torch.equal(eager[k], meta[k]) for k in eager)
    assert losses(runs["false"]) == losses(runs["true"])


def _single() -> Strategy:
    return Strategy(StrategyOptions(name="single"), DistInfo(0, 1, 0, 1, torch.device("cpu"), None), StepSettings())


def test_meta_build_materialises_with_the_models_own_init_or_reset_parameters() -> None:
    cfg = GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16)
    torch.manual_seed(3)
    eager = GPT(cfg)
    torch.manual_seed(3)
    with torch.device("meta"):
        meta = GPT(cfg)
    model, _ = _single().setup(meta, lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), model.state_dict().values()))
    # No init_weights: every submodule's reset_parameters (torch's default init) gives the values.
    with torch.device("meta"):
        plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    plain, _ = _single().setup(plain, lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert not any(p.is_meta for p in plain.parameters())
    assert torch.equal(plain[1].weight, torch.ones(8)) and plain[0].weight.abs().max() <= 0.5
    # accelerate.init_empty_weights: parameters on meta, buffers real and kept.
    init_empty_weights = pytest.importorskip("accelerate").init_empty_weights

    with init_empty_weights():
        scaled = torch.nn.Sequential(torch.nn.Linear(4, 4))
        scaled.register_buffer("scale", torch.tensor([2.0]))
    assert scaled[0].weight.is_meta and not scaled.scale.is_meta
    scaled, _ = _single().setup(scaled, lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert not scaled[0].weight.is_meta and torch.equal(scaled.scale, torch.tensor([2.0]))


@pytest.mark.parametrize("strategy", ["deepspeed"])
def test_meta_init_is_refused_where_the_strategy_cannot_shard_it(tmp_path: Path, strategy: str) -> None:
    r = launch_here("recipe=gpt", f"strategy={strategy}", "trainer.meta_init=true", f"run_dir={tmp_path}/run")
    assert r.returncode == 2 and "trainer.meta_init is not supported with strategy=deepspeed" in r.stderr


def test_a_size_preset_sets_the_shapes_and_refuses_a_contradiction(tmp_path: Path) -> None:
    r = launch_here("recipe=gpt", "model.preset=gpt2-medium", "--cfg")
    assert r.returncode == 0 and "n_layer: 24" in r.stdout and "d_model: 1024" in r.stdout, r.stderr
    r = launch_here("recipe=gpt", "model.preset=gpt2", "model.n_layer=2", f"run_dir={tmp_path}/run")
    assert r.returncode == 2 and "model.n_layer=2 contradicts model.preset=gpt2 (n_layer=12)" in r.stderr
