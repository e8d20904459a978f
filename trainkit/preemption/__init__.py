"""Preemption: every notice (signal, AWS spot, GCP preemption, Ray drain) sets one flag.

    watcher = PreemptionWatcher(aws_endpoint=cfg.aws_metadata, gcp_endpoint=cfg.gcp_metadata).start()
    for step in ...:
        train_step()
        if agree_stop(watcher):        # a collective: every rank stops at the same step
            ckpt.save(step, state, blocking=True)
            raise Preempted(...)       # exit code 75: "preempted, resumable"

See docs/preemption.md.
"""

from trainkit.errors import EXIT_PREEMPTED, Preempted
from trainkit.preemption.watcher import (AWSSpotPoller, GCPPreemptionPoller, PreemptionWatcher, agree_stop,
                                         request)

__all__ = ["AWSSpotPoller", "EXIT_PREEMPTED", "GCPPreemptionPoller", "Preempted", "PreemptionWatcher", "agree_stop", "request"]
