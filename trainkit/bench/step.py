"""Step overhead: trainkit's loop vs the same loop written by hand in plain PyTorch.

Both loops train the same model on the same in-memory batches, both alive in one process and
taking turns every ``--block`` steps (one logging window), so the machine's drift in speed hits
both alike; the figure is the median ratio of neighbouring blocks' times. (Whole rounds of a few
seconds each, run one loop after the other, spread ±10 % on the project's 2-core machine and
could not resolve a 2 % difference.) Data loading and checkpointing are off: this isolates what
the Run API adds around forward/backward/step (bookkeeping, the stop/save agreement, logging).

``--strategy single`` (the default) runs both loops in this process. ``--strategy ddp|fsdp``
starts ``--workers`` processes (gloo on CPU, NCCL on GPUs) that run trainkit's loop and a
hand-written ``DistributedDataParallel`` (or FSDP2 ``fully_shard``) loop in turn. There the
agreement has peers, so a collective or a host-device wait added to every step would show:
the model is kept small on purpose. Each worker is this module run as a script
(``python -m trainkit.bench.step WORKER_JSON``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainkit.bench import report
from trainkit.config import Config

LOG_EVERY = 10
# Batches each rank holds in memory; the loops cycle through them.
DISTINCT_BATCHES = 200
# Blocks of each loop left out of the figures: first steps (optimizer state, first records).
WARMUP_BLOCKS = 2


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


def plain_loop(batches: Iterable[Any], width: int, depth: int, strategy: str = "single",
               device: torch.device = torch.device("cpu")) -> Iterator[None]:
    """The loop as one writes it by hand: wrap, step, read the loss every LOG_EVERY steps
    (averaged over ranks, as a logging loop does). Yields after each step."""
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
    yield
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
        yield


def trainkit_loop(batches: Iterable[Any], steps: int, global_batch: int, width: int, depth: int, run_dir: str,
                  strategy: str = "single", threads: int = 0, agree_every_s: float | None = None) -> Iterator[None]:
    """trainkit's loop on the same model and data, logging every LOG_EVERY steps (loss averaged
    over ranks, memory peak, a metrics record) with the stop/save agreement on; yields after each
    step, its set-up before the first."""
    from trainkit.run import Run

    cfg = Config(run_dir=run_dir)
    cfg.strategy.name = strategy
    cfg.trainer.max_steps = steps
    cfg.trainer.log_every = LOG_EVERY
    cfg.trainer.progress = "off"
    cfg.trainer.threads = threads
    if agree_every_s is not None:
        cfg.preemption.agree_every_s = agree_every_s
    cfg.checkpoint.enabled = False
    cfg.checkpoint.export_safetensors = False
    cfg.data.batch_size = global_batch
    cfg.optim.weight_decay = 0.0
    run = Run(cfg)
    model, opt = run.setup(_model(width, depth), run.optimizer())
    loss_fn = nn.CrossEntropyLoss()
    yield
    for x, y in run.steps(batches):
        with run.autocast():
            loss = loss_fn(model(x), y)
        run.backward(loss)
        run.optimizer_step(opt)
        yield
    run.finish()


def interleaved(ours: Iterator[None], plain: Iterator[None], blocks: int, block: int, device: torch.device
                ) -> tuple[list[float], list[float]]:
    """Seconds per block of ``block`` steps of each loop, the loops taking turns block by block
    (the order swapped every block), so a change in the machine's speed — on a shared or
    throttled machine it drifts by ±10 % within seconds — hits both loops within one block of
    each other. Each loop's set-up runs before the first block; the device is synchronised at
    the end of every block, so a block's time is its work's."""
    next(ours)
    next(plain)
    if dist.is_initialized():
        dist.barrier()
    times: tuple[list[float], list[float]] = ([], [])
    for k in range(blocks):
        for which in ((0, 1) if k % 2 == 0 else (1, 0)):
            loop = (ours, plain)[which]
            t0 = time.perf_counter()
            for _ in range(block):
                next(loop)
            _sync(device)
            times[which].append(time.perf_counter() - t0)
    for _ in ours:  # trainkit's end of run (the last record)
        pass
    return times


def _measure(batches: list[Any], a: dict[str, Any], device: torch.device, run_dir: str) -> tuple[list[float], list[float]]:
    """Both loops on ``batches`` (cycled), taking turns: seconds per block of each."""
    steps = a["blocks"] * a["block"]
    warm = plain_loop(batches[:20], a["width"], a["depth"], a["strategy"], device)
    for _ in warm:  # warm-up: allocator, kernels
        pass
    ours = trainkit_loop(itertools.islice(itertools.cycle(batches), steps), steps, a["batch"], a["width"], a["depth"], run_dir,
                         a["strategy"], a["threads"], a["agree_every_s"])
    plain = plain_loop(itertools.islice(itertools.cycle(batches), steps), a["width"], a["depth"], a["strategy"], device)
    return interleaved(ours, plain, a["blocks"], a["block"], device)


def _worker(a: dict[str, Any]) -> None:
    """One rank of a distributed measurement; rank 0 prints the per-block times."""
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
        batches = _batches(DISTINCT_BATCHES, a["micro"], a["width"], seed=rank, device=device)
        ours, plain = _measure(batches, a, device, a["run_dir"])
        if rank == 0:
            print("RESULT " + json.dumps({"ours": ours, "plain": plain, "backend": dist.get_backend(),
                                          "device": str(device)}), flush=True)
        dist.barrier()
        dist.destroy_process_group()


def _distributed(args: argparse.Namespace, device: str, run_dir: str) -> dict[str, Any]:
    from trainkit.distributed import free_port

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    spec = {**_spec(args, threads), "device": device, "micro": args.batch // args.workers, "run_dir": run_dir}
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


def _spec(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    return {"strategy": args.strategy, "blocks": args.blocks + WARMUP_BLOCKS, "block": args.block,
            "batch": args.batch, "width": args.width, "depth": args.depth, "threads": threads,
            "agree_every_s": args.agree_every_s}


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q[0], q[2]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m trainkit.bench step")
    p.add_argument("--strategy", choices=["single", "ddp", "fsdp"], default="single")
    p.add_argument("--workers", type=int, default=1, help="processes for ddp/fsdp (one per GPU on CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="global batch: split over the workers")
    p.add_argument("--blocks", type=int, default=200, help="blocks per loop, the loops taking turns block by block")
    p.add_argument("--block", type=int, default=LOG_EVERY,
                   help=f"steps per block (default {LOG_EVERY}: one logging step in each)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per process (0: cores / workers)")
    p.add_argument("--agree-every-s", type=float, default=None,
                   help="trainkit's preemption.agree_every_s (default: the config's), to price the stop/save agreement")
    p.add_argument("--out", help="append a markdown section with the results to this file")
    args = p.parse_args(argv)
    if args.strategy == "single" and args.workers != 1:
        p.error("--workers > 1 needs --strategy ddp or fsdp")
    if args.batch % args.workers:
        p.error("--batch must be a multiple of --workers")
    if args.blocks < 1 or args.block < 1:
        p.error("--blocks and --block must be at least 1")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    info = report.machine()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.strategy == "single":
            if args.threads:
                torch.set_num_threads(args.threads)
            dev = torch.device(device)
            spec = _spec(args, args.threads)
            ours, plain = _measure(_batches(DISTINCT_BATCHES, args.batch, args.width, device=dev), spec, dev, tmp)
            result = {"ours": ours, "plain": plain, "backend": None, "device": device,
                      "threads": torch.get_num_threads()}
        else:
            result = _distributed(args, device, tmp)
    wall = time.perf_counter() - t_start
    ours, plain = result["ours"][WARMUP_BLOCKS:], result["plain"][WARMUP_BLOCKS:]
    ratios = [o / q for o, q in zip(ours, plain)]
    ratio, (q1, q3), total = statistics.median(ratios), _quartiles(ratios), sum(ours) / sum(plain)
    plain_ms, ours_ms = statistics.median(plain) / args.block * 1e3, statistics.median(ours) / args.block * 1e3
    params = sum(q.numel() for q in _model(args.width, args.depth).parameters())
    hand = {"single": "plain PyTorch", "ddp": "hand-written DDP", "fsdp": "hand-written FSDP2"}[args.strategy]
    where = f"{args.workers} x {result['backend']}" if result["backend"] else "one process"
    lines = [
        f"model: MLP {args.depth}x{args.width} ({params / 1e6:.2f}M params), global batch {args.batch}, "
        f"{args.blocks} blocks of {args.block} steps per loop (after {WARMUP_BLOCKS} warm-up blocks), the loops taking "
        f"turns block by block; strategy {args.strategy} on {where} ({result['device']}), "
        f"{result['threads']} threads per process",
        f"{hand} step:".ljust(26) + f"{plain_ms:.3f} ms (median block / {args.block})",
        "trainkit step:".ljust(26) + f"{ours_ms:.3f} ms (median block / {args.block})",
        f"ratio trainkit/{hand}: {ratio:.4f} (median over {len(ratios)} pairs of neighbouring blocks; "
        f"quartiles {q1:.3f}-{q3:.3f}; total time {total:.4f})",
    ]
    print("\n".join(lines))
    load_end, commit_end = report.load_avg(), report.git_commit()
    print(f"machine: {report.describe(info)}; commit {report.commits(info['git_commit'], commit_end)}; "
          f"load average {info['load_avg']} at start, {load_end} at end")
    raw = {"bench": "step", "strategy": args.strategy, "workers": args.workers, **result, "ratios": ratios,
           "ratio": ratio, "quartiles": [q1, q3], "total_ratio": total, "plain_ms": plain_ms, "trainkit_ms": ours_ms,
           "params": params, "width": args.width, "depth": args.depth, "batch": args.batch, "blocks": args.blocks,
           "block": args.block, "warmup_blocks": WARMUP_BLOCKS}
    print(json.dumps(raw))
    if args.out:
        command = "python -m trainkit.bench step " + " ".join(argv)
        body = [report.table(["loop", "median step (ms)"], [[hand, f"{plain_ms:.3f}"], ["trainkit", f"{ours_ms:.3f}"]]),
                lines[0], lines[-1]]
        report.append(args.out, report.section(command.strip(), info, body, raw, wall_s=wall, load_end=load_end,
                                               commit_end=commit_end), "Step overhead")


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
