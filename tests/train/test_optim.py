"""The configured optimizer: decay only on matrices, and no second group that changes nothing."""

from __future__ import annotations

import torch
from torch import nn

from trainkit.optim import OptimConfig, optimizer_factory


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def _trained(opt_of) -> dict[str, torch.Tensor]:
    model = _model()
    opt = opt_of(list(model.parameters()))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        model(torch.randn(4, 8, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def test_weight_decay_goes_to_matrices_only() -> None:
    model = _model()
    opt = optimizer_factory(OptimConfig(weight_decay=0.1))(list(model.parameters()))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}


def test_without_weight_decay_one_group_trains_exactly_as_the_plain_optimizer() -> None:
    model = _model()
    opt = optimizer_factory(OptimConfig())(list(model.parameters()))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == list(model.parameters())  # the model's order
    ours = _trained(optimizer_factory(OptimConfig()))
    plain = _trained(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0))
    assert all(torch.equal(ours[k], plain[k]) for k in plain)
