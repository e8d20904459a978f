"""Parity with plain PyTorch, in the style of Lightning Fabric's tests: trainkit's ``ddp`` on
2 gloo workers ends with the same weights as a hand-written DistributedDataParallel loop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from trainkit import distributed
from trainkit.distributed import free_port

from spawning import spawn

STEPS, GLOBAL_BATCH, WIDTH = 12, 16, 32


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 4))


def _batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(STEPS):
        x, y = torch.randn(GLOBAL_BATCH, WIDTH, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
        per = GLOBAL_BATCH // world
        out.append((x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]))
    return out


@distributed.exit_guard()
def _worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    loss_fn = nn.CrossEntropyLoss()
    if mode == "plain":
        dist.init_process_group("gloo")
        distributed.keep_until_exit(dist.group.WORLD)
        torch.manual_seed(7)
        model = nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        for x, y in _batches(rank, world):
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        state = model.module.state_dict()
        dist.destroy_process_group()
    else:
        from trainkit import Config, Run

        cfg = Config(run_dir=f"{out}/run", seed=7)
        cfg.strategy.name = "ddp"
        cfg.trainer.max_steps = STEPS
        cfg.trainer.progress = "off"
        cfg.trainer.threads = 1
        cfg.checkpoint.enabled = False
        cfg.data.batch_size = GLOBAL_BATCH
        cfg.optim.lr = 1e-2
        run = Run(cfg)
        model, opt = run.setup(_model(), run.optimizer())
        for x, y in run.steps(_batches(rank, world)):
            run.backward(loss_fn(model(x), y))
            run.optimizer_step(opt)
        state = model.module.state_dict()
        run.finish()
    if rank == 0:
        torch.save(state, f"{out}/{mode}.pt")



@pytest.mark.rotate("parity")
def test_ddp_matches_handwritten_ddp(tmp_path: Path) -> None:
    for mode in ("plain", "trainkit"):
        spawn(_worker, (2, free_port(), str(tmp_path), mode), nprocs=2)
    plain = torch.load(tmp_path / "plain.pt")
    ours = torch.load(tmp_path / "trainkit.pt")
    assert plain.keys() == ours.keys()
    for key in plain:
        torch.testing.assert_close(ours[key], plain[key], rtol=0, atol=1e-6, msg=key)
    assert any(not torch.equal(plain[k], _model().state_dict()[k]) for k in plain), "weights must have moved"
