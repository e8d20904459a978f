"""Bring your script (docs/quickstart.md): a plain PyTorch DDP script.

Run: torchrun --nproc-per-node 2 plain_train.py --steps 200
"""
import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


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
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    step = 0
    for x, y in batches(lambda: step, dist.get_rank(), 32 // dist.get_world_size()):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        if step == args.steps:
            break
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
