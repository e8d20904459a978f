"""A trainkit script with strategy=accelerate, for ``accelerate launch`` (tests/accelerate)."""
import sys

import torch
from torch import nn

import trainkit

run = trainkit.Run({"run_dir": sys.argv[1], "strategy": {"name": "accelerate"}, "data": {"batch_size": 32},
                    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0},
                    "trainer": {"max_steps": 20, "log_every": 1, "progress": "plain"}})
model, opt = run.setup(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)),
                       run.optimizer())
run.restore(model=model, optimizer=opt)


def batches():
    while True:
        g = torch.Generator().manual_seed(run.step * 1000 + run.dist.rank)
        x = torch.randn(run.micro_batch, 16, generator=g)
        yield x, x.sum(dim=1, keepdim=True)


for x, y in run.steps(batches()):
    with run.autocast():
        loss = nn.functional.mse_loss(model(x).float(), y)
    run.backward(loss)
    run.optimizer_step(opt)
run.finish()
