"""One recipe's training loop with ``torch.cuda.set_sync_debug_mode("error")`` on every
step that neither logs nor saves: ``python sync_worker.py JSON`` (a process of its own, since
a 1-rank process group leaves its environment behind).

It is ``trainkit.train.train``'s loop, with the mode switched at the step boundaries: any
host-device synchronisation on such a step raises and fails the run.
"""

from __future__ import annotations

import json
import sys

import torch


def main(a: dict) -> None:
    from trainkit.launch.compose import compose_config
    from trainkit.launch.prepare import prepare
    from trainkit.run import Run
    from trainkit.tasks import TASKS
    from trainkit.tasks.base import default_url
    from trainkit.train import _to

    # The mode must be able to fail: a deliberate read of a device scalar raises under it.
    probe = torch.ones((), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        probe.item()
    except RuntimeError:
        pass
    else:
        sys.exit("sync debug mode did not catch .item()")
    finally:
        torch.cuda.set_sync_debug_mode("default")

    cfg = compose_config(a["overrides"])
    prepare(cfg)
    task = TASKS.get(cfg.task, "task")
    run = Run(cfg)
    model, opt = run.setup(task.build_model(task.model_config(**cfg.model)), run.optimizer())
    data = run.loader(run.stream(cfg.data.url or default_url(task, cfg.model)))
    run.restore(model=model, optimizer=opt, data=data)
    t = cfg.trainer
    every = cfg.checkpoint.every_steps

    def quiet(step: int) -> bool:
        """A step (and the boundary after it) that neither logs nor saves, past the warm-up."""
        return step > a["warmup"] and step % t.log_every != 0 and step != t.max_steps and not (every and step % every == 0)

    checked = 0
    steps = iter(run.steps(data, tokens_per_sample=task.tokens_per_sample(cfg.model)))
    while True:
        # The boundary after step run.step runs inside next(): logging, saving, the agreement.
        torch.cuda.set_sync_debug_mode("error" if quiet(run.step) else "default")
        try:
            batch = next(steps)
        except StopIteration:
            break
        torch.cuda.set_sync_debug_mode("error" if quiet(run.step + 1) else "default")
        checked += quiet(run.step + 1)
        batch = _to(batch, run.dist.device)
        with run.autocast():
            loss, _ = task.loss(model, batch)
        run.backward(loss)
        run.optimizer_step(opt)
    torch.cuda.set_sync_debug_mode("default")
    run.finish()
    print("CHECKED " + json.dumps({"steps": checked}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
