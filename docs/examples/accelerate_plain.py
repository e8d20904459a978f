"""Bring your Accelerate loop (docs/quickstart.md): a plain Accelerate loop.

Run: accelerate launch --multi_gpu --num_processes 2 accelerate_plain.py --steps 200
"""
import argparse

import torch
from accelerate import Accelerator
from torch import nn


def samples(n=4096):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(n, 16, generator=g)
    return [{"x": x, "y": x.sum(dim=0, keepdim=True)} for x in xs]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--run-dir", default="runs/accelerate-loop")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(samples(), batch_size=16, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    step = 0
    while step < args.steps:
        for batch in loader:
            loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == args.steps:
                break
    accelerator.end_training()


if __name__ == "__main__":
    main()
