"""Preemption: every notice (signal, AWS spot, GCP preemption, Ray drain) sets one flag, and
the ranks agree on the step at which they stop.

    watcher = PreemptionWatcher(aws_endpoint=..., gcp_endpoint=...).start()
    agreement = StepAgreement()               # its own gloo group: create it on every rank
    for step in ...:
        train_step()
        if agreement.decide(watcher.requested, save=False).stop:   # every rank, every step
            ckpt.save(step, state, blocking=True)
            raise Preempted(...)              # exit code 75: "preempted, resumable"

See docs/preemption.md.
"""

from trainkit.errors import EXIT_PREEMPTED, Preempted
from trainkit.preemption.agreement import Decision, StepAgreement, add_boundary_hook, remove_boundary_hook
from trainkit.preemption.watcher import AWSSpotPoller, GCPPreemptionPoller, PreemptionWatcher, request

__all__ = ["AWSSpotPoller", "Decision", "EXIT_PREEMPTED", "GCPPreemptionPoller", "Preempted", "PreemptionWatcher",
           "StepAgreement", "add_boundary_hook", "remove_boundary_hook", "request"]
