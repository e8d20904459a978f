"""Step overhead: trainkit's loop vs the same loop written by hand in plain PyTorch.

Both loops train the same model on the same in-memory batches, in alternating rounds so
machine noise hits both alike; the figure is the median ratio of per-step times. Data loading
and checkpointing are off: this isolates what the Run API adds around forward/backward/step
(bookkeeping, the stop/save agreement, logging).

``--strategy single`` (the default) runs both loops in this process. ``--strategy ddp|fsdp``
starts ``--workers`` processes (gloo on CPU, NCCL on GPUs) that run trainkit's loop and a
hand-written ``DistributedDataParallel`` (or FSDP2 ``fully_shard``) loop in turn. There the
agreement has peers, so a collective or a host-device wait added to every step would show:
the model is kept small on purpose. Each worker is this module run as a script
(``python -m trainkit.bench.step WORKER_JSON``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainkit.bench import report
from trainkit.config import Config

LOG_EVERY = 10


class _MLP(nn.Module):
    """Blocks in an ``nn.ModuleList``: the unit trainkit's FSDP shards, and the hand-written one."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    return _MLP(width, depth)


def _batches(n: int, batch: int, width: int, seed: int = 0, device: torch.device | None = None
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(batch, width, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(n)]
    return [(x.to(device), y.to(device)) for x, y in out] if device is not None else out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(batches: list[Any], width: int, depth: int, strategy: str = "single",
               device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """The loop as one writes it by hand: wrap, step, read the loss every LOG_EVERY steps
    (averaged over ranks, as a logging loop does)."""
    model = _model(width, depth).to(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    if strategy != "single":
        dist.barrier()
    marks = [time.perf_counter()]
    for i, (x, y) in enumerate(batches):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (i + 1) % LOG_EVERY == 0:
            value = loss.detach().clone()
            if strategy != "single":
                dist.all_reduce(value)
            value.item()
        marks.append(time.perf_counter())
    _sync(device)
    return _timed(marks, len(batches))


def _timed(marks: list[float], steps: int) -> tuple[float, float]:
    """(mean step time over the loop, median time between step ends). The median is robust
    to bursts of load from other processes; it leaves out the logging steps (one in LOG_EVERY)."""
    return (time.perf_counter() - marks[0]) / steps, statistics.median(b - a for a, b in zip(marks, marks[1:]))


def trainkit_loop(batches: list[Any], width: int, depth: int, run_dir: str, strategy: str = "single",
                  threads: int = 0, agree_every_s: float | None = None) -> tuple[float, float]:
    from trainkit.run import Run

    cfg = Config(run_dir=run_dir)
    cfg.strategy.name = strategy
    cfg.trainer.max_steps = len(batches)
    cfg.trainer.log_every = LOG_EVERY
    cfg.trainer.progress = "off"
    cfg.trainer.threads = threads
    if agree_every_s is not None:
        cfg.preemption.agree_every_s = agree_every_s
    cfg.checkpoint.enabled = False
    cfg.checkpoint.export_safetensors = False
    cfg.data.batch_size = batches[0][0].shape[0] * (dist.get_world_size() if dist.is_initialized() else 1)
    cfg.optim.weight_decay = 0.0
    run = Run(cfg)
    model, opt = run.setup(_model(width, depth), run.optimizer())
    loss_fn = nn.CrossEntropyLoss()
    if strategy != "single":
        dist.barrier()
    marks = [time.perf_counter()]
    for x, y in run.steps(batches):
        with run.autocast():
            loss = loss_fn(model(x), y)
        run.backward(loss)
        run.optimizer_step(opt)
        marks.append(time.perf_counter())
    _sync(run.dist.device)
    timed = _timed(marks, len(batches))
    run.finish()
    return timed


def _rounds(rounds: int, ours: Any, plain: Any) -> tuple[list[Any], list[Any]]:
    """Alternating rounds, the order swapped every round so a drift in speed hits both."""
    a, b = [], []
    for r in range(rounds):
        if r % 2:
            b.append(plain(r))
            a.append(ours(r))
        else:
            a.append(ours(r))
            b.append(plain(r))
    return a, b


def _worker(a: dict[str, Any]) -> None:
    """One rank of a distributed measurement; rank 0 prints the per-round step times."""
    from trainkit import distributed

    with distributed.exit_guard():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        cuda = a["device"] == "cuda"
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        distributed.keep_until_exit(dist.group.WORLD)
        torch.set_num_threads(a["threads"])
        rank = dist.get_rank()
        batches = _batches(a["steps"], a["micro"], a["width"], seed=rank, device=device)
        plain_loop(batches[:20], a["width"], a["depth"], a["strategy"], device)  # warm-up: allocator, kernels
        ours, plain = _rounds(
            a["rounds"],
            lambda r: trainkit_loop(batches, a["width"], a["depth"], f"{a['run_dir']}/r{r}", a["strategy"], a["threads"],
                                    a["agree_every_s"]),
            lambda r: plain_loop(batches, a["width"], a["depth"], a["strategy"], device),
        )
        if rank == 0:
            print("RESULT " + json.dumps({"ours": ours, "plain": plain, "backend": dist.get_backend(),
                                          "device": str(device)}), flush=True)
        dist.barrier()
        dist.destroy_process_group()


def _distributed(args: argparse.Namespace, device: str, run_dir: str) -> dict[str, Any]:
    from trainkit.distributed import free_port

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    spec = {"strategy": args.strategy, "device": device, "steps": args.steps, "rounds": args.rounds,
            "micro": args.batch // args.workers, "width": args.width, "depth": args.depth, "threads": threads,
            "agree_every_s": args.agree_every_s, "run_dir": run_dir}
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(args.workers),
               LOCAL_WORLD_SIZE=str(args.workers), OMP_NUM_THREADS=str(threads))
    procs = [subprocess.Popen([sys.executable, "-m", "trainkit.bench.step", json.dumps(spec)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in range(args.workers)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"bench step: a worker failed (exit codes {[p.returncode for p in procs]})")
    line = next(x for x in outs[0].splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "threads": threads}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m trainkit.bench step")
    p.add_argument("--strategy", choices=["single", "ddp", "fsdp"], default="single")
    p.add_argument("--workers", type=int, default=1, help="processes for ddp/fsdp (one per GPU on CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="global batch: split over the workers")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per process (0: cores / workers)")
    p.add_argument("--agree-every-s", type=float, default=None,
                   help="trainkit's preemption.agree_every_s (default: the config's), to price the stop/save agreement")
    p.add_argument("--out", help="append a markdown section with the results to this file")
    args = p.parse_args(argv)
    if args.strategy == "single" and args.workers != 1:
        p.error("--workers > 1 needs --strategy ddp or fsdp")
    if args.batch % args.workers:
        p.error("--batch must be a multiple of --workers")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    info = report.machine()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.strategy == "single":
            if args.threads:
                torch.set_num_threads(args.threads)
            dev = torch.device(device)
            batches = _batches(args.steps, args.batch, args.width, device=dev)
            plain_loop(batches[:20], args.width, args.depth, device=dev)  # warm-up: allocator, kernels
            ours, plain = _rounds(args.rounds,
                                  lambda r: trainkit_loop(batches, args.width, args.depth, f"{tmp}/r{r}",
                                                          threads=args.threads, agree_every_s=args.agree_every_s),
                                  lambda r: plain_loop(batches, args.width, args.depth, device=dev))
            result = {"ours": ours, "plain": plain, "backend": None, "device": device,
                      "threads": torch.get_num_threads()}
        else:
            result = _distributed(args, device, tmp)
    wall = time.perf_counter() - t_start
    ours, plain = [t[0] for t in result["ours"]], [t[0] for t in result["plain"]]
    ratios = [o / q for o, q in zip(ours, plain)]
    step_ratios = [o[1] / q[1] for o, q in zip(result["ours"], result["plain"])]
    params = sum(q.numel() for q in _model(args.width, args.depth).parameters())
    hand = {"single": "plain PyTorch", "ddp": "hand-written DDP", "fsdp": "hand-written FSDP2"}[args.strategy]
    where = f"{args.workers} x {result['backend']}" if result["backend"] else "one process"
    lines = [
        f"model: MLP {args.depth}x{args.width} ({params / 1e6:.2f}M params), global batch {args.batch}, "
        f"{args.steps} steps x {args.rounds} rounds, strategy {args.strategy} on {where} ({result['device']}), "
        f"{result['threads']} threads per process",
        f"{hand} step:".ljust(26) + f"{statistics.median(plain) * 1e3:.3f} ms (median)",
        "trainkit step:".ljust(26) + f"{statistics.median(ours) * 1e3:.3f} ms (median)",
        f"ratio trainkit/{hand}: {statistics.median(ratios):.4f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})",
        f"median single-step ratio (non-logging steps, robust to load bursts): {statistics.median(step_ratios):.4f} "
        f"(per round: {', '.join(f'{r:.3f}' for r in step_ratios)})",
    ]
    print("\n".join(lines))
    load_end, commit_end = report.load_avg(), report.git_commit()
    print(f"machine: {report.describe(info)}; commit {report.commits(info['git_commit'], commit_end)}; "
          f"load average {info['load_avg']} at start, {load_end} at end")
    raw = {"bench": "step", "strategy": args.strategy, "workers": args.workers, **result, "ratios": ratios,
           "ratio": statistics.median(ratios), "step_ratios": step_ratios, "step_ratio": statistics.median(step_ratios), "plain_ms": statistics.median(plain) * 1e3,
           "trainkit_ms": statistics.median(ours) * 1e3, "params": params, "width": args.width, "depth": args.depth,
           "batch": args.batch, "steps": args.steps, "rounds": args.rounds}
    print(json.dumps(raw))
    if args.out:
        command = "python -m trainkit.bench step " + " ".join(argv)
        body = [report.table(["loop", "median step (ms)"], [[hand, f"{raw['plain_ms']:.3f}"],
                                                            ["trainkit", f"{raw['trainkit_ms']:.3f}"]]),
                lines[0], lines[-2], lines[-1]]
        report.append(args.out, report.section(command.strip(), info, body, raw, wall_s=wall, load_end=load_end,
                                               commit_end=commit_end), "Step overhead")


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
