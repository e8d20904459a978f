"""The deferred stop/save agreement is exact: over many SIGTERMs at random steps, every rank
stops and saves at the same step, the boundary after the first send at or after the earliest
flag (``agreement.lag`` after it when every step sends), a timer save lands at the same
boundary after any rank raised it, and no step is lost across the relaunch. With
``every_s`` > 0 the ranks send only every few steps, on one schedule rank 0 sets.

Two real gloo processes drive :class:`StepAgreement` with real signals (``agreement_workers.py``);
the bookkeeping around it in ``Run`` is covered by the chaos and resume tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainkit.checkpoint import Checkpointer
from trainkit.distributed import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _first(flags: list[list[bool]], index: int) -> int | None:
    """The first boundary (1-based) at which a flag was raised."""
    return next((i + 1 for i, f in enumerate(flags) if f[index]), None)


def _run_workers(args: dict) -> None:
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


@pytest.mark.parametrize("every_s, rounds", [(0.0, 40), (0.01, 20)], ids=["every-step", "every-10ms"])
def test_every_rank_stops_and_saves_at_the_agreed_step(tmp_path, every_s, rounds):
    out = tmp_path / "out"
    out.mkdir()
    args = {"root": str(tmp_path / "ck"), "out": str(out), "rounds": rounds, "seed": 7, "max_flag_step": 12,
            "every_s": every_s}
    _run_workers(args)
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
        # One schedule of sends on both ranks; every step sends when every_s is 0.
        assert a["sent"] == b["sent"], r
        if every_s == 0:
            assert all(a["sent"]), r
        # Both ranks were told the same thing at every boundary: at the boundary after a send,
        # the MAX of what the ranks raised since the send before; nothing elsewhere.
        assert a["told"] == b["told"], r
        held = [False, False]
        for i, told in enumerate(a["told"]):
            expected = [False, False]
            if i >= lag and a["sent"][i - lag]:
                expected, held = held, [False, False]
            assert told == expected, (r, i)
            held = [held[k] or a["raised"][i][k] or b["raised"][i][k] for k in (0, 1)]
        # Same step on both ranks: the boundary after the first send at or after the earliest flag.
        first_send = next(i + 1 for i in range(earliest - 1, len(a["sent"])) if a["sent"][i])
        assert a["stop_local"] == b["stop_local"] == first_send + lag, r
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
    if every_s:
        assert not all(all(a["sent"]) for a in ranks[0]), "rank 0 never proposed a period longer than a step"
    assert Checkpointer(args["root"]).latest_step() == step


def test_pauses_at_some_boundaries_do_not_shorten_the_period(tmp_path):
    """Steps of 5 ms with a 100 ms pause at every 4th boundary (a save, a logging step), at most
    one send per 50 ms: the step time is the median interval, so the ranks send about every 10
    steps. Counted as the time between sends over the steps in between, the pauses shortened it
    to about four (24 sends in these 100 boundaries instead of at most 16)."""
    out = tmp_path / "out"
    out.mkdir()
    args = {"mode": "period", "out": str(out), "steps": 120, "every_s": 0.05, "step_s": 0.005,
            "pause_every": 4, "pause_s": 0.1}
    _run_workers(args)
    sent = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert sent[0] == sent[1]  # one schedule
    later = sent[0][20:]  # after the first intervals are measured
    assert sum(later) <= len(later) // 6, sent[0]
