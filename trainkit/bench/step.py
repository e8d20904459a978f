"""Step overhead: trainkit's loop vs the same loop written by hand in plain PyTorch.

Both loops train the same model on the same in-memory batches in this process, in
alternating rounds so machine noise hits both alike; the figure is the median ratio of
per-step times. Data loading and checkpointing are off: this isolates what the Run API
adds around forward/backward/step (bookkeeping, the per-step agreement collective, logging).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

from trainkit.bench import report
from trainkit.config import Config


def _model(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _batches(n: int, batch: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, width, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]


def plain_loop(batches: list[Any], width: int, depth: int) -> float:
    torch.manual_seed(0)
    model = _model(width, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (i + 1) % 10 == 0:
            loss.item()
    return (time.perf_counter() - t0) / len(batches)


def trainkit_loop(batches: list[Any], width: int, depth: int, run_dir: str) -> float:
    from trainkit.run import Run

    cfg = Config(run_dir=run_dir)
    cfg.strategy.name = "single"
    cfg.trainer.max_steps = len(batches)
    cfg.trainer.log_every = 10
    cfg.trainer.progress = "off"
    cfg.checkpoint.enabled = False
    cfg.data.batch_size = batches[0][0].shape[0]
    cfg.optim.weight_decay = 0.0
    run = Run(cfg)
    model, opt = run.setup(_model(width, depth), run.optimizer())
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for x, y in run.steps(batches):
        with run.autocast():
            loss = loss_fn(model(x), y)
        run.backward(loss)
        run.optimizer_step(opt)
    elapsed = (time.perf_counter() - t0) / len(batches)
    run.finish()
    return elapsed


def main(argv: list[str]) -> None:
    import tempfile

    p = argparse.ArgumentParser(prog="python -m trainkit.bench step")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = report.machine()
    batches = _batches(args.steps, args.batch, args.width)
    plain_loop(batches[:20], args.width, args.depth)  # warm-up: allocator, kernels
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            ours.append(trainkit_loop(batches, args.width, args.depth, f"{tmp}/r{r}"))
            plain.append(plain_loop(batches, args.width, args.depth))
    ratios = [o / p for o, p in zip(ours, plain)]
    params = sum(p.numel() for p in _model(args.width, args.depth).parameters())
    print(f"model: MLP {args.depth}x{args.width} ({params / 1e6:.2f}M params), batch {args.batch}, "
          f"{args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads")
    print(f"plain PyTorch step:  {statistics.median(plain) * 1e3:.3f} ms (median)")
    print(f"trainkit step:       {statistics.median(ours) * 1e3:.3f} ms (median)")
    print(f"ratio trainkit/plain: {statistics.median(ratios):.4f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"machine: {report.describe(info)}; commit {report.commits(info['git_commit'], report.git_commit())}; "
          f"load average {info['load_avg']} at start, {report.load_avg()} at end")
