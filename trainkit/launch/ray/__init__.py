"""``launcher=ray``: the same training function on a Ray cluster, through Ray Train.

One ``TorchTrainer`` per run: Ray places ``launcher.workers`` actors, sets up the torch
process group (gloo or nccl) and calls the worker entry (:mod:`.worker`) in each, which runs
:func:`trainkit.train.train` exactly as the local launcher's workers do. Fault tolerance is
Ray's: a lost worker or node fails the group, Ray's failure policy restarts it (up to
``launcher.max_failures``, -1 for ever) and the restarted workers call ``train`` again, whose
``Run.restore`` loads trainkit's latest committed checkpoint from the same ``run_dir``.
Ray's own checkpoint bookkeeping is not used: trainkit's ``latest`` pointer is the truth.

Preemption on Ray reaches the same stop path as a SIGTERM on a VM:

* a Ray node drain is polled in each worker (:mod:`.drain`) and handed to trainkit's
  PreemptionWatcher; the ranks agree on a step, save and leave with exit 75;
* a stop signal to the driver (SIGTERM) is handed to the workers through a named actor
  (:mod:`.stop`); they agree, save and leave with 75, and the job ends with 75;
* a worker leaving with 75 (or any retryable error) fails the group and Ray restarts it;
  the failure policy (:mod:`.failure`) charges a 75 to Ray's preemption budget, not to
  ``max_failures``, and stops at once on an exit 2 (bad config or store).

The driver's exit code matches the local launcher (:mod:`.exits`): 0 done, 1 failed, 2
config/store error, 75 out of retries while preempted. ``address=""`` starts a private Ray
on 127.0.0.1 for the duration of the command; ``address=auto`` or ``ray://host:10001`` joins
an existing cluster (:mod:`.session`). :mod:`.warm_pool` keeps pre-imported processes for
restarts. Nothing here imports Ray until a job runs, so any config validates without it.
"""

from trainkit.launch.ray.launcher import RayLauncher
from trainkit.launch.ray.options import RayOptions

__all__ = ["RayLauncher", "RayOptions"]
