"""Boundary hooks of the step agreement (what launcher=ray's reports and drain probe use): a
hook one rank says is due acts on every rank at the same boundary, one step later, so its
``act`` may itself be a collective; an ``act`` returning True stops every rank there.

Two real gloo processes; each ``act`` runs an all-reduce, so ranks acting at different
boundaries would deadlock (the test then times out) instead of passing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainkit.distributed import free_port

REPO = Path(__file__).resolve().parents[2]

BODY = r'''
import json, os, sys
import torch, torch.distributed as dist
from trainkit import distributed
from trainkit.preemption import StepAgreement, add_boundary_hook, remove_boundary_hook

class Hook:
    def __init__(self, due_at, stop):
        self.due_at, self.stop, self.acted = due_at, stop, []
        self.boundary = 0
    def due(self):
        return self.boundary in self.due_at
    def act(self):
        t = torch.tensor([self.boundary])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a collective inside act: same boundary or deadlock
        self.acted.append([self.boundary, int(t)])
        return self.stop

with distributed.exit_guard():
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
    distributed.keep_until_exit(dist.group.WORLD)
    rank = dist.get_rank()
    report = Hook({3} if rank == 0 else {7}, stop=False)
    probe = Hook({10} if rank == 1 else set(), stop=True)
    for h in (report, probe):
        add_boundary_hook(h)
    agreement = StepAgreement()
    for h in (report, probe):
        remove_boundary_hook(h)
    stopped = None
    for boundary in range(1, 30):
        report.boundary = probe.boundary = boundary
        if agreement.decide(False, False).stop:
            stopped = boundary
            break
    agreement.drain()
    json.dump({"report": report.acted, "probe": probe.acted, "stopped": stopped,
               "later": len(StepAgreement()._hooks)}, open(sys.argv[1] + f"/rank{rank}.json", "w"))
    dist.destroy_process_group()
'''


@pytest.mark.slow  # ~20 s (two torch start-ups); the Ray Result test is the default proof through Ray
def test_a_hook_due_on_one_rank_acts_on_all_at_the_same_boundary(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, "-c", BODY, str(tmp_path)], env={**env, "RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
             for r in range(2)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        # Due at boundary 3 on rank 0 and 7 on rank 1: acted on both, one boundary later.
        assert got["report"] == [[4, 4], [8, 8]]
        # Due at 10 on rank 1 only, and it stops: both act and stop at 11.
        assert got["probe"] == [[11, 11]] and got["stopped"] == 11
        assert got["later"] == 0  # an agreement made after the hooks were removed has none
