"""Bring your Accelerate loop (docs/quickstart.md): the same loop with trainkit's checkpoints.

Run: python -m trainkit.launch script=accelerate_loop.py launcher.workers=2 -- --steps 200
"""
import argparse

import torch
from accelerate import Accelerator
from torch import nn

from trainkit.checkpoint.accelerate import AcceleratorCheckpoints
from trainkit.data import write_shards


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
    if accelerator.is_main_process:
        write_shards(samples(), f"{args.run_dir}/data")
    accelerator.wait_for_everyone()
    ckpt = AcceleratorCheckpoints(accelerator, args.run_dir, every_steps=20)
    loader = ckpt.loader(f"{args.run_dir}/data", batch_size=32)
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt.restore(model=model, optimizer=optimizer, data=loader)
    for batch in ckpt.steps(loader, max_steps=args.steps):
        loss = nn.functional.mse_loss(model(batch["x"]), batch["y"])
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        ckpt.log(loss=loss)
    ckpt.finish()
    accelerator.end_training()


if __name__ == "__main__":
    main()
