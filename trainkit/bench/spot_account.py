"""Goodput of a job under a spot schedule, and where the rest of its wall time went.

The accounting is the run report's own (:func:`trainkit.cost.goodput.goodput`, the same
buckets summary.json and ``python -m trainkit.report`` show); the bench adds what only it
saw, on hand-made records as easily as on a real job:

* ``final``: ``metrics.jsonl`` when the job ended (the history: a restore drops the records
  past its checkpoint, so each step is there once);
* ``seen``: every metrics record the bench saw while the job ran, including those a restore
  later dropped (the work that was thrown away), to check the run's own count of them;
* ``events``: ``events.jsonl`` (see :mod:`trainkit.rundir`);
* ``fired``: the schedule's events as carried out (kind, planned and actual time);
* ``t_launch`` / ``t_end``: when the launcher process was started and when it exited.

``wall_s = t_end - t_launch``: the launcher's time before the first attempt began (driver,
Ray, the worker group) is added to ``startup``; its time after the run's last record (Ray's
and the driver's shutdown) is ``exit``, a bucket of the bench's own. ``goodput = useful_s / wall_s``; ``useful_s`` is the kept steps' time
less their data wait and checkpoint blocking. ``steady_goodput`` puts the same steps at the
median step time, and ``steady_goodput_training`` the same over the training span only (the
first attempt's first step to the run's last record: the launch's start-up and exit, a fixed
cost of any job whatever its faults, left out). Each fired event gets one row: what the attempt it hit lost (recompute,
emergency save, downtime) and what the next attempt took to start (start-up, restore).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from trainkit import rundir
from trainkit.cost.goodput import BUCKETS, goodput

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
    g = goodput([dict(r) for r in final], [dict(e) for e in events])
    spans = g["spans"]
    wall_s = t_end - t_launch
    split = {f"{k}_s": v for k, v in g["badput_s"].items()}
    if spans:
        first = min(s["began"] for s in spans)
        split["startup_s"] += first - t_launch
        split["exit_s"] = t_end - (first + g["wall_s"])
    else:
        split["other_s"] = wall_s - g["useful_s"] - sum(v for k, v in split.items() if k != "other_s")
    seen_by = _by_attempt(seen)
    fired = sorted(fired, key=lambda f: float(f["fired_at"]))
    rows: list[dict[str, Any]] = []
    unscheduled = 0
    for span, nxt in zip(spans, spans[1:]):
        hits = [f for f in fired if span["start"] <= float(f["fired_at"]) < nxt["start"]]
        if not hits:
            unscheduled += 1
            continue
        event = hits[0]
        t_event = float(event["fired_at"])
        lost = span["badput_s"]
        came = nxt["badput_s"]
        restore = _restore_of(events, nxt["start"], span["start"])
        first = min((_time(r) for r in seen_by.get(nxt["attempt"], [])), default=None)
        parts = {"recompute_s": lost["recompute"], "emergency_save_s": lost["emergency_save"],
                 "downtime_s": lost["downtime"], "startup_s": came["startup"], "restore_s": came["restore"]}
        rows.append({
            "kind": event["kind"],
            "planned_s": event.get("planned_s"),
            "fired_s": t_event - t_launch,
            "attempt": span["attempt"],
            "notice_to_stop_s": span["end"] - t_event if span["status"] == "preempted" and event["kind"] == "drain"
            else None,
            "to_first_step_s": first - t_event if first is not None else None,
            **parts,
            # The attempt's end -> the next one's start event: downtime, start-up and restore.
            "restart_s": parts["downtime_s"] + parts["startup_s"] + parts["restore_s"],
            "cost_s": sum(parts.values()),
            "recomputed_steps": restore.get("recomputed_steps"),
            "lost_records": sum(1 for r in seen_by.get(span["attempt"], [])
                                if int(r["step"]) > int(restore.get("step", 1 << 62))),
            "restored_step": restore.get("step"),
        })
    steps_done = g["useful_steps"]
    training_s = t_end - min(s["start"] for s in spans) - split["exit_s"] if spans else 0.0
    # As the bench counted before the report's accounting was its own: data wait as useful.
    with_wait = g["useful_s"] + g["badput_s"]["data_wait"]
    return {
        "wall_s": wall_s,
        "useful_s": g["useful_s"],
        "goodput": g["useful_s"] / wall_s if wall_s > 0 else None,
        "goodput_with_data_wait": with_wait / wall_s if wall_s > 0 else None,
        "steady_goodput": g["median_step_s"] * steps_done / wall_s if wall_s > 0 else None,
        "steady_goodput_training": g["median_step_s"] * steps_done / training_s if training_s > 0 else None,
        "median_step_s": g["median_step_s"],
        "steps": g["steps"] if final else 0,
        "attempts": g["attempts"],
        "split": {f"{k}_s": split.get(f"{k}_s", 0.0) for k in (*BUCKETS, "exit")},
        "interruption_s": g["interruption_s"],
        "events": rows,
        "unscheduled_restarts": unscheduled,
        "fired": len(fired),
    }


def _restore_of(events: Sequence[Record], start: float, after: float) -> Mapping[str, Any]:
    """The ``restore`` event that led to the attempt starting at ``start`` ({} when none)."""
    found = [e for e in events if e.get("event") == rundir.RESTORE.name and after < float(e.get("time", 0)) <= start]
    return found[-1] if found else {}


def _by_attempt(records: Sequence[Record]) -> dict[Any, list[Record]]:
    out: dict[Any, list[Record]] = {}
    for r in records:
        if isinstance(r.get("time"), (int, float)) and isinstance(r.get("step"), (int, float)):
            out.setdefault(r.get("attempt"), []).append(r)
    return out
