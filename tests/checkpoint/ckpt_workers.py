"""Worker processes for the checkpoint tests: ``python ckpt_workers.py FN JSON_ARGS``.

Ranks come from RANK/WORLD_SIZE/MASTER_* (gloo on loopback). Results go to files under
``args["out"]`` (safetensors dumps of the full state, JSON stats), never to stdout parsing.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainkit import distributed, storage
from trainkit.checkpoint import Checkpointer, ModelOptimState, RNGState, _codec

torch.set_num_threads(1)


def init_dist(strategy: str) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "single" and world == 1:
        return 0, 1
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=world)
    distributed.keep_until_exit(dist.group.WORLD)
    return dist.get_rank(), world


def build(strategy: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return model, opt


def train_step(model, opt) -> None:
    x = torch.randn(8, 16)
    scale = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
    loss = (model(x) * scale).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def dump(model, opt, meta: dict, path: Path) -> None:
    """Full (gathered) model+optimizer state as safetensors on rank 0; collective."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, opt, options=opts)
    if (dist.get_rank() if dist.is_initialized() else 0) != 0:
        return
    tree, tensors = _codec.split({"model": msd, "optim": osd})
    tensors = {k: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone().contiguous()
               for k, t in tensors.items()}
    save_file(tensors, str(path))
    path.with_suffix(".json").write_text(json.dumps({"tree": tree, "meta": meta}))


def train(a: dict) -> None:
    strategy = a["strategy"]
    rank, world = init_dist(strategy)
    if a.get("storage"):
        storage.configure(a["storage"])
    out = Path(a["out"])
    out.mkdir(parents=True, exist_ok=True)
    model, opt = build(strategy)
    torch.manual_seed(1000 + rank)
    random.seed(2000 + rank)
    np.random.seed(3000 + rank)
    meta = {"step": 0, "world": world}
    state = {"app": ModelOptimState(model, opt), "meta": meta, "rng": RNGState()}
    if a.get("ballast_mb"):
        state["ballast"] = {"w": torch.randn(a["ballast_mb"] << 18)}
    step = 0
    stats: dict = {"blocking": [], "loaded": None}
    if a.get("load_root"):
        ck_in = Checkpointer(a["load_root"], async_save=False)
        loaded = ck_in.load(state, a.get("load_step"))
        ck_in.close()
        stats["loaded"] = loaded
        if loaded is not None:
            assert meta["step"] == loaded, (meta, loaded)
            step = loaded
            dump(model, opt, {"step": step}, out / f"{a.get('tag', 'run')}_loaded_{step}.safetensors")
    ck = Checkpointer(a["root"], keep_last=a.get("keep_last", 2), keep_every=a.get("keep_every", 0),
                      async_save=a.get("async", True)) if a.get("root") else None
    while step < a["steps"]:
        step += 1
        train_step(model, opt)
        meta["step"] = step
        if ck is not None and step in a.get("save_at", []):
            if step in a.get("dump_at", []):
                dump(model, opt, {"step": step}, out / f"{a.get('tag', 'run')}_saved_{step}.safetensors")
            ck.save(step, state, blocking=a.get("blocking", False))
            stats["blocking"].append(ck.last_blocking_s)
            if a.get("marker"):
                print(f"SAVING {step}", flush=True)
            if step == max(a["save_at"]):
                time.sleep(a.get("sleep_after_save", 0))
    if ck is not None:
        ck.close()
        stats["last_save_s"] = ck.last_save_s
    dump(model, opt, {"step": step}, out / f"{a.get('tag', 'run')}_final_{step}.safetensors")
    (out / f"{a.get('tag', 'run')}_stats_rank{rank}.json").write_text(json.dumps(stats))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def peer_dies_mid_save(a: dict) -> None:
    """Step 1 is saved by both ranks; then rank 1 dies, and rank 0 saves step 2 and tears its
    process group down while that save is in flight (as a launcher does to a worker whose
    peer died). Rank 0 writes what ``wait`` raised."""
    rank, _ = init_dist("ddp")
    model, opt = build("replicated")  # no DDP: rank 0's second step needs no collective
    state = {"app": ModelOptimState(model, opt), "meta": {"step": 1}}
    ck = Checkpointer(a["root"])
    train_step(model, opt)
    ck.save(1, state, blocking=True)
    if rank == 1:
        os._exit(3)
    train_step(model, opt)
    state["meta"]["step"] = 2
    ck.save(2, state)
    dist.destroy_process_group()
    try:
        ck.wait()
        raised = None
    except Exception as exc:  # noqa: BLE001 - reported to the test
        raised = f"{type(exc).__name__}: {exc}"
    Path(a["out"]).write_text(json.dumps({"raised": raised}))


def warm(a: dict) -> None:
    """Warm-starts a model built apart from the source (weights moved off) and dumps it."""
    from trainkit.checkpoint.warm import warm_start

    strategy = a["strategy"]
    init_dist(strategy)
    model, opt = build(strategy)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    print(warm_start(model, opt, a["source"], load_optimizer=a.get("load_optimizer", False)), flush=True)
    out = Path(a["out"])
    out.mkdir(parents=True, exist_ok=True)
    dump(model, opt, {}, out / f"{a['tag']}_warm.safetensors")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def ds_train(a: dict) -> None:
    """DeepSpeed ZeRO-2 on gloo: train, save/load through DeepSpeedCheckpointer."""
    import deepspeed

    from trainkit.checkpoint.deepspeed import DeepSpeedCheckpointer

    if a.get("storage"):
        storage.configure(a["storage"])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    torch.manual_seed(1000 + rank)
    meta = {"step": 0}
    state = {"rng": RNGState(), "meta": meta}
    ck = DeepSpeedCheckpointer(a["root"], engine, keep_last=2)
    step = 0
    if a.get("load"):
        step = ck.load(state) or 0
        assert meta["step"] == step
    out = Path(a["out"])
    out.mkdir(parents=True, exist_ok=True)
    while step < a["steps"]:
        step += 1
        loss = engine(torch.randn(4, 16)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        meta["step"] = step
        if step in a.get("save_at", []):
            ck.save(step, state)
    ck.close()
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()},
                  str(out / f"{a['tag']}_final.safetensors"))
        (out / f"{a['tag']}_stats.json").write_text(json.dumps({"step": step, "steps": ck.steps()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    fn, args = sys.argv[1], json.loads(sys.argv[2])
    with distributed.exit_guard():
        globals()[fn](args)
