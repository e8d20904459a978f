"""Goodput of a job under a spot schedule, and where the rest of its wall time went.

Pure functions over what the job and the bench recorded, so they can be checked on
hand-made records whose answer is known:

* ``final``: ``metrics.jsonl`` when the job ended (the history: a restore drops the records
  past its checkpoint, so each step is there once);
* ``seen``: every metrics record the bench saw while the job ran, including those a restore
  later dropped (the work that was thrown away);
* ``events``: ``events.jsonl`` (see :mod:`trainkit.rundir`; split into attempts by
  :func:`trainkit.report.goodput.attempts`, as the run report does);
* ``fired``: the schedule's events as carried out (kind, planned and actual time);
* ``t_launch`` / ``t_end``: when the launcher process was started and when it exited.

``useful_s`` is the step time of the steps in the final history, less the part of it that
training spent blocked on checkpoint saves; ``goodput = useful_s / wall_s`` with
``wall_s = t_end - t_launch``: start-up, every restart and the final save are in the wall
time. Steps within an attempt are timed back to back (each record's ``step_time_s`` runs
from the previous record), so the wall time splits exactly into:

* ``startup_s``: launch -> the first attempt's ``start`` event (driver, Ray, worker group,
  process group, model, data, restore);
* ``useful_s`` and ``checkpoint_blocking_s``: the kept steps;
* ``recompute_s``: steps an attempt ran past its last checkpoint (recomputed by the next
  one), plus the step in progress when its node was killed;
* ``emergency_save_s``: a preempted attempt's last step -> its ``preempted`` event (the
  blocking save inside the grace window);
* ``restart_s``: an attempt's end -> the next attempt's ``start`` event (failure
  detection, group teardown, new workers, process group, restore);
* ``finish_s``: the last step -> the launcher's exit (final save, export, eval, shutdown);
* ``unattributed_s``: what is left, the clock skew between step timers and timestamps.

Slower steps count as useful time under that definition (a save in the background, a
node booting on the same machine), so ``steady_goodput`` is reported beside it: the final
history's steps at the median step time, over the wall time.
"""

from __future__ import annotations

from collections import Counter

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from trainkit import rundir
from trainkit.report.goodput import attempts as split_attempts
from trainkit.report.goodput import covered_steps

Record = Mapping[str, Any]


def _time(record: Record) -> float:
    return float(record["time"])


def history_problems(final: Sequence[Record], max_steps: int) -> list[str]:
    """What is wrong with the final history: each step 1..max_steps exactly once, in order."""
    steps = [int(r["step"]) for r in final if isinstance(r.get("step"), (int, float))]
    problems = []
    dup = sorted(s for s, n in Counter(steps).items() if n > 1)
    if dup:
        problems.append(f"steps logged more than once: {dup[:10]}")
    missing = sorted(set(range(1, max_steps + 1)) - set(steps))
    if missing:
        problems.append(f"{len(missing)} steps missing, first {missing[:10]}")
    if steps != sorted(steps):
        problems.append("steps out of order")
    return problems


def account(final: Sequence[Record], seen: Sequence[Record], events: Sequence[Record],
            fired: Sequence[Mapping[str, Any]], t_launch: float, t_end: float) -> dict[str, Any]:
    """Goodput, the split of the wall time, and one row per fired event (see the module doc)."""
    final = sorted((r for r in final if isinstance(r.get("step"), (int, float))), key=lambda r: int(r["step"]))
    attempts = split_attempts(events)
    covered = covered_steps(final, {a["attempt"]: a["start_step"] for a in attempts})
    step_s = sum(float(r.get("step_time_s") or 0.0) * n for r, n in zip(final, covered))
    blocking_s = sum(float(r.get("checkpoint_block_s") or 0.0) * n for r, n in zip(final, covered))
    useful_s = step_s - blocking_s
    wall_s = t_end - t_launch

    seen_by = _by_attempt(seen)
    final_by = _by_attempt(final)
    fired = sorted(fired, key=lambda f: float(f["fired_at"]))
    split = {"startup_s": (attempts[0]["start"] if attempts else t_end) - t_launch,
             "checkpoint_blocking_s": blocking_s, "recompute_s": 0.0, "emergency_save_s": 0.0,
             "restart_s": 0.0, "finish_s": 0.0}
    rows: list[dict[str, Any]] = []
    unscheduled = 0
    for i, a in enumerate(attempts):
        rows_seen = seen_by.get(a["attempt"], [])
        kept_end = max((_time(r) for r in final_by.get(a["attempt"], [])), default=a["start"])
        loop_end = max((_time(r) for r in rows_seen), default=a["start"])
        if i + 1 == len(attempts):
            split["finish_s"] = t_end - max(loop_end, kept_end)
            continue
        hits = [f for f in fired if a["start"] <= float(f["fired_at"]) < a["next_start"]]
        kills = [float(f["fired_at"]) for f in hits if f["kind"] == "kill"]
        if kills:
            loop_end = max(loop_end, min(kills))  # the step in progress at the kill is lost too
        terminal = a["terminal"]
        pre = terminal if terminal is not None and terminal.get("event") == rundir.PREEMPTED.name else None
        end = max(loop_end, _time(pre)) if pre else loop_end
        recompute = max(0.0, loop_end - kept_end)
        save = end - loop_end
        restart = a["next_start"] - end
        split["recompute_s"] += recompute
        split["emergency_save_s"] += save
        split["restart_s"] += restart
        nxt = attempts[i + 1]
        restore = nxt["restore"] or {}
        first = min((_time(r) for r in seen_by.get(nxt["attempt"], [])), default=None)
        if not hits:
            unscheduled += 1
            continue
        event = hits[0]
        t_event = float(event["fired_at"])
        rows.append({
            "kind": event["kind"],
            "planned_s": event.get("planned_s"),
            "fired_s": t_event - t_launch,
            "attempt": a["attempt"],
            "notice_to_stop_s": _time(pre) - t_event if pre and event["kind"] == "drain" else None,
            "to_first_step_s": first - t_event if first is not None else None,
            "cost_s": recompute + save + restart,
            "recomputed_steps": restore.get("recomputed_steps"),
            "lost_records": sum(1 for r in rows_seen if int(r["step"]) > int(restore.get("step", math.inf))),
            "recompute_s": recompute,
            "emergency_save_s": save,
            "restart_s": restart,
            "restored_step": restore.get("step"),
        })
    accounted = useful_s + sum(split.values())
    median_s = statistics.median(float(r.get("step_time_s") or 0.0) for r in final) if final else 0.0
    steady_s = median_s * sum(covered)
    split["unattributed_s"] = wall_s - accounted
    return {
        "wall_s": wall_s,
        "useful_s": useful_s,
        "goodput": useful_s / wall_s if wall_s > 0 else None,
        "steady_goodput": steady_s / wall_s if wall_s > 0 else None,
        "median_step_s": median_s,
        "steps": int(final[-1]["step"]) if final else 0,
        "attempts": len(attempts),
        "split": split,
        "events": rows,
        "unscheduled_restarts": unscheduled,
        "fired": len(fired),
    }


def _by_attempt(records: Sequence[Record]) -> dict[Any, list[Record]]:
    out: dict[Any, list[Record]] = {}
    for r in records:
        if isinstance(r.get("time"), (int, float)) and isinstance(r.get("step"), (int, float)):
            out.setdefault(r.get("attempt"), []).append(r)
    return out
