"""``launcher=ray``: the same training function on a Ray cluster, through Ray Train.

One ``TorchTrainer`` per run, on Ray's public API: Ray places ``launcher.workers`` actors,
sets up the torch process group (gloo or nccl) and calls the worker entry (:mod:`.worker`)
in each, which runs :func:`trainkit.train.train` exactly as the local launcher's workers do.
Fault tolerance is Ray's: a lost worker or node fails the group, Ray restarts it
(``FailureConfig(max_failures=launcher.max_failures,
max_preemption_failures=launcher.max_preemption_failures)``, -1 for ever) and the restarted
workers call ``train`` again, whose ``Run.restore`` loads trainkit's latest committed
checkpoint from the same ``run_dir``.

Ray sees the run (:mod:`.report`): each logged record and each committed checkpoint (as a
small pointer directory, nothing copied) goes to ``ray.train.report``, so ``Result.metrics``,
``Result.checkpoint`` and Ray's dashboard follow it; trainkit's ``latest`` pointer stays the
truth for resume.

Preemption on Ray reaches the same stop path as a SIGTERM on a VM:

* a Ray node drain is asked for with ``ray.train.get_preemption_info()`` at agreed step
  boundaries (:class:`.report.PreemptionProbe`); the ranks agree on a step, save and leave
  with exit 75, and Ray restarts the group;
* a stop signal to the driver (SIGTERM) is handed to the workers through a named actor
  (:mod:`.stop`); they agree, save and return 75 as their value, and the job ends with 75;
* a config or store error (2) is returned as a value too, so Ray does not retry it.

The driver's exit code matches the local launcher (:mod:`.exits`): 0 done, 1 failed, 2
config/store error, 75 stopped or out of retries while preempted. ``address=""`` starts a
private Ray on 127.0.0.1 for the duration of the command; ``address=auto`` or
``ray://host:10001`` joins an existing cluster (:mod:`.session`). :mod:`.warm_pool`
(experimental, opt-in) keeps pre-imported processes for restarts. Nothing here imports Ray
until a job runs, so any config validates without it.

For a ``TorchTrainer`` of one's own: ``train_loop_per_worker=train_loop_per_worker`` with
``train_loop_config=worker_cfg(cfg)`` (docs/clusters.md).
"""

from typing import Any

from trainkit.launch.ray.launcher import RayLauncher, build_trainer, worker_cfg
from trainkit.launch.ray.options import RayOptions


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The training function for a ``TorchTrainer`` of one's own: :func:`.worker.ray_worker_main`."""
    from trainkit.launch.ray.worker import ray_worker_main

    return ray_worker_main(config)


__all__ = ["RayLauncher", "RayOptions", "build_trainer", "train_loop_per_worker", "worker_cfg"]
