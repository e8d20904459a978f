"""The training function every recipe runs: a task's model and data through the Run API.

Launchers (local, Ray) call :func:`main` in each worker with the validated config; it is
also the reference for a loop of one's own: nothing here is private to the recipes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from trainkit.config import load_config
from trainkit.data import default_collate
from trainkit.run import Run
from trainkit.tasks import TASKS
from trainkit.tasks.base import default_url


def train(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    cfg = load_config(cfg_dict)
    task = TASKS.get(cfg.task, "task")
    model_cfg = task.model_config(**cfg.model)
    run = Run(cfg)
    stream = run.stream(cfg.data.url or default_url(task, cfg.model))
    if cfg.trainer.meta_init:
        with torch.device("meta"):
            model = task.build_model(model_cfg)
        model, opt = run.setup(model, run.optimizer())
        flops = training_flops(run, task, model, stream)  # a meta model cannot run before setup
    else:
        model = task.build_model(model_cfg)
        flops = training_flops(run, task, model, stream)
        model, opt = run.setup(model, run.optimizer())
    data = run.loader(stream)
    run.restore(model=model, optimizer=opt, data=data)
    model.train()
    for batch in run.steps(data, tokens_per_sample=task.tokens_per_sample(cfg.model), flops_per_sample=flops):
        batch = _to(batch, run.dist.device)
        with run.autocast():
            loss, _ = task.loss(model, batch)
        run.backward(loss)
        run.optimizer_step(opt)
    return run.finish(**evaluate(run, model, task, cfg.data.url))


def training_flops(run: Run, task: Any, model: torch.nn.Module, stream: Any) -> float:
    """Forward + backward FLOPs per sample, counted once on one sample; only where MFU can be
    reported (a GPU whose peak is known), since counting costs a forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainkit.metrics.mfu import peak_flops

    if peak_flops(run.dist.device, torch.bfloat16) is None:
        return 0.0
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        task.loss(model, _to(default_collate([stream[0]]), next(model.parameters()).device))
    return 3.0 * counter.get_total_flops()


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module, task: Any, train_url: str) -> dict[str, float]:
    """Loss and accuracy on the held-out split, which sits beside ``train`` in the store.

    Every rank runs the same batches (sharded models need all ranks in each forward), so the
    result is identical everywhere without a collective.
    """
    url = (train_url or default_url(task, run.cfg.model)).rstrip("/")
    if not url.endswith("/train"):
        return {}
    stream = run.stream(url[: -len("train")] + "eval")
    model.eval()
    total = {"eval_loss": 0.0, "eval_accuracy": 0.0}
    size = run.micro_batch
    n = len(stream)
    for start in range(0, n, size):
        ids = range(start, min(n, start + size))
        batch = default_collate([stream[i] for i in ids])
        batch = _to(batch, run.dist.device)
        with run.autocast():
            loss, extra = task.loss(model, batch)
        total["eval_loss"] += float(loss) * len(ids)
        total["eval_accuracy"] += float(extra["accuracy"]) * len(ids)
    model.train()
    return {k: v / max(1, n) for k, v in total.items()}


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

