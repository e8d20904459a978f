"""A 2-rank gloo body for the agreement's exactness test: ``python agreement_workers.py JSON``.

Each round is one attempt of a training job: a fresh watcher and agreement, steps that take
a different, random time on each rank, a real SIGTERM to one or both ranks at steps drawn
from the round's seed (each rank sends it to itself, inside a step), timer-save flags raised
at random boundaries, then the emergency save at the agreed stop step and a load of it, as a
relaunch would. Every rank writes what it raised and what it was told at each boundary.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time


def main(a: dict) -> None:
    import torch
    import torch.distributed as dist

    from trainkit import distributed
    from trainkit.checkpoint import Checkpointer
    from trainkit.preemption import PreemptionWatcher, StepAgreement

    with distributed.exit_guard():
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        distributed.keep_until_exit(dist.group.WORLD)
        rank = dist.get_rank()
        ck = Checkpointer(a["root"], keep_last=2)
        jitter = random.Random(1000 + rank)  # this rank's own step times
        step = 0  # the job's step, carried over rounds through the checkpoint
        weights = torch.zeros(4)
        rounds = []
        for r in range(a["rounds"]):
            plan = random.Random(a["seed"] * 100_003 + r)  # the same draws on every rank
            who = plan.choice([[0], [1], [0, 1]])
            flag_at = {k: plan.randint(1, a["max_flag_step"]) for k in who}
            save_at = {k: {s for s in range(1, a["max_flag_step"] + 3) if plan.random() < 0.25} for k in (0, 1)}
            watcher = PreemptionWatcher(signals=["SIGTERM"]).start()
            agreement = StepAgreement(watcher, every_s=a["every_s"])
            raised, told, sent = [], [], []
            local = 0
            while True:
                local += 1
                step += 1
                weights += 1  # the step's work
                time.sleep(jitter.random() * 0.003 * (1 + rank))
                if flag_at.get(rank) == local:
                    os.kill(os.getpid(), signal.SIGTERM)
                flags = (watcher.requested, local in save_at[rank])
                decision = agreement.decide(*flags)
                raised.append(flags)
                told.append((decision.stop, decision.save))
                sent.append(agreement.submitted)
                if decision.stop:
                    break
                if local > 10 * a["max_flag_step"]:
                    sys.exit(3)
            agreement.drain()
            ck.save(step, {"state": {"weights": weights, "counter": {"step": step}}}, blocking=True)
            latest = ck.latest_step()
            reason = watcher.reason
            watcher.stop()
            # The relaunch: the next round starts from what the checkpoint holds.
            target = {"state": {"weights": torch.full((4,), -1.0), "counter": {"step": -1}}}
            loaded = ck.load(target)
            step = target["state"]["counter"]["step"]
            weights = target["state"]["weights"]
            rounds.append({"flag_at": {str(k): v for k, v in flag_at.items()}, "lag": agreement.lag,
                           "raised": raised, "told": told, "sent": sent, "stop_local": local, "saved_step": latest,
                           "loaded_step": loaded, "loaded_counter": step, "loaded_weight": float(weights[0]),
                           "reason": reason})
        ck.close()
        with open(os.path.join(a["out"], f"rank{rank}.json"), "w") as f:
            json.dump(rounds, f)
        dist.destroy_process_group()


def period(a: dict) -> None:
    """Steps of ``step_s`` with a pause of ``pause_s`` at every ``pause_every``-th boundary (a
    logging step, a save): each rank writes at which boundaries the agreement sent."""
    import torch.distributed as dist

    from trainkit import distributed
    from trainkit.preemption import StepAgreement

    with distributed.exit_guard():
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        distributed.keep_until_exit(dist.group.WORLD)
        agreement = StepAgreement(every_s=a["every_s"])
        sent = []
        for step in range(1, a["steps"] + 1):
            time.sleep(a["step_s"] + (a["pause_s"] if step % a["pause_every"] == 0 else 0.0))
            agreement.decide(False, False)
            sent.append(agreement.submitted)
        agreement.drain()
        with open(os.path.join(a["out"], f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(sent, f)
        dist.destroy_process_group()


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    if args.get("mode") == "period":
        period(args)
    else:
        main(args)
