"""Bring your script (docs/quickstart.md): the same script with trainkit.

Run: python -m trainkit.launch script=train_script.py launcher.workers=2 -- --steps 200
"""
import argparse

import torch
from torch import nn

import trainkit


def batches(step, rank, micro):
    """Synthetic regression data, a pure function of (step, rank)."""
    while True:
        g = torch.Generator().manual_seed(step() * 1000 + rank)
        x = torch.randn(micro, 16, generator=g)
        yield x, x.sum(dim=1, keepdim=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    run = trainkit.Run({"run_dir": "runs/my-script", "trainer": {"max_steps": args.steps}, "data": {"batch_size": 32}})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    model, opt = run.setup(model, torch.optim.SGD(model.parameters(), lr=args.lr))
    run.restore(model=model, optimizer=opt)
    for x, y in run.steps(batches(lambda: run.step, run.dist.rank, run.micro_batch)):
        loss = nn.functional.mse_loss(model(x), y)
        run.backward(loss)
        run.optimizer_step(opt)
    run.finish()


if __name__ == "__main__":
    main()
