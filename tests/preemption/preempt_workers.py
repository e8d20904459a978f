"""Subprocess bodies for the preemption tests: ``python preempt_workers.py FN JSON``."""

from __future__ import annotations

import json
import os
import sys
import time


def signals(a: dict) -> None:
    """A 'training loop' that stops at a step boundary on the first signal, takes a slow
    emergency save (during which the test sends more signals), then exits 75."""
    from trainkit.errors import EXIT_PREEMPTED
    from trainkit.preemption import PreemptionWatcher

    w = PreemptionWatcher(signals=a["signals"]).start()
    print("READY", flush=True)
    step = 0
    while not w.requested:
        step += 1
        time.sleep(0.01)
        if step > 3000:
            sys.exit(3)
    print(f"STOP {step} {w.reason}", flush=True)
    print("SAVING", flush=True)
    deadline = time.monotonic() + a["save_seconds"]
    while time.monotonic() < deadline:  # an emergency checkpoint that further signals must not break
        time.sleep(0.01)
    with open(a["out"], "w") as f:
        json.dump({"step": step, "reason": w.reason, "signals": w.signal_count}, f)
    print("SAVED", flush=True)
    w.stop()
    sys.exit(EXIT_PREEMPTED)


def agree(a: dict) -> None:
    """2 gloo ranks; only one gets SIGTERM. Both must stop at the same step, checkpoint
    there (trainkit Checkpointer), and exit 75."""
    import torch
    import torch.distributed as dist

    from trainkit import distributed
    from trainkit.checkpoint import Checkpointer
    from trainkit.errors import EXIT_PREEMPTED
    from trainkit.preemption import PreemptionWatcher, StepAgreement

    with distributed.exit_guard():
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        distributed.keep_until_exit(dist.group.WORLD)
        rank = dist.get_rank()
        w = PreemptionWatcher(signals=["SIGTERM"]).start()
        ck = Checkpointer(a["root"])
        agreement = StepAgreement(w)
        counter = {"step": 0}
        weights = {"w": torch.zeros(4)}
        with open(os.path.join(a["out"], f"ready{rank}"), "w"):
            pass
        step = 0
        while True:
            step += 1
            weights["w"] += 1
            counter["step"] = step
            time.sleep(0.02 * (1 + rank))  # ranks run at different speeds
            if agreement.decide(w.requested, False).stop:
                break
            if step > 5000:
                sys.exit(3)
        ck.save(step, {"state": {"weights": weights, "counter": counter}}, blocking=True)
        ck.close()
        with open(os.path.join(a["out"], f"rank{rank}.json"), "w") as f:
            json.dump({"step": step, "reason": w.reason, "signals": w.signal_count}, f)
        dist.destroy_process_group()
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    globals()[sys.argv[1]](json.loads(sys.argv[2]))
