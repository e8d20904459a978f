"""The deferred stop/save agreement is exact: over many SIGTERMs at random steps, every rank
stops and saves at the same step, exactly ``agreement.lag`` after the earliest flag, a timer
save lands ``lag`` after any rank raised it, and no step is lost across the relaunch.

Two real gloo processes drive :class:`StepAgreement` with real signals (``agreement_workers.py``);
the bookkeeping around it in ``Run`` is covered by the chaos and resume tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from trainkit.checkpoint import Checkpointer
from trainkit.distributed import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ROUNDS = 40


def _first(flags: list[list[bool]], index: int) -> int | None:
    """The first boundary (1-based) at which a flag was raised."""
    return next((i + 1 for i, f in enumerate(flags) if f[index]), None)


def test_every_rank_stops_and_saves_at_the_agreed_step(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    args = {"root": str(tmp_path / "ck"), "out": str(out), "rounds": ROUNDS, "seed": 7, "max_flag_step": 12}
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, str(HERE / "agreement_workers.py"), json.dumps(args)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, cwd=str(REPO)) for r in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    step = 0
    for r, (a, b) in enumerate(zip(*ranks)):
        lag = a["lag"]
        assert lag == b["lag"] == 1
        # Each rank's SIGTERM raised its flag at the planned step (when the run got that far).
        for rank, rec in enumerate((a, b)):
            planned = rec["flag_at"].get(str(rank))
            first = _first(rec["raised"], 0)
            assert first == (planned if planned is not None and planned <= rec["stop_local"] else None), (r, rank)
        earliest = min(f for f in (_first(a["raised"], 0), _first(b["raised"], 0)) if f is not None)
        # Same step on both ranks, exactly lag after the earliest flag.
        assert a["stop_local"] == b["stop_local"] == earliest + lag, r
        # Both ranks were told the same thing at every boundary: the MAX of what the ranks
        # raised lag boundaries before (nothing at the first ones).
        assert a["told"] == b["told"], r
        for i, told in enumerate(a["told"]):
            before = i - lag
            expected = [False, False] if before < 0 else [a["raised"][before][k] or b["raised"][before][k]
                                                          for k in (0, 1)]
            assert told == expected, (r, i)
        # The emergency save is committed at the stop step on both, and the relaunch
        # continues from it: no step lost, none repeated.
        step += a["stop_local"]
        for rec in (a, b):
            assert rec["saved_step"] == rec["loaded_step"] == rec["loaded_counter"] == step, r
            assert rec["loaded_weight"] == float(step), r
        signalled = {int(k) for k, v in a["flag_at"].items() if v <= a["stop_local"]}
        for rank, rec in enumerate((a, b)):
            assert rec["reason"] == ("signal SIGTERM" if rank in signalled else
                                     "peer rank requested a stop (agreed at a step boundary)"), (r, rank)
    # Both kinds of round happened: one rank told, and both told at different steps.
    assert {len(a["flag_at"]) for a in ranks[0]} == {1, 2}
    assert any(any(t[1] for t in a["told"]) for a in ranks[0])  # timer saves were agreed too
    assert Checkpointer(args["root"]).latest_step() == step
