"""Goodput and badput: where a run's wall-clock time went, from its logs alone.

Pure functions over the parsed ``metrics.jsonl`` and ``events.jsonl`` records; no I/O, so they
can be tested on hand-built logs whose right answer is known. ``Run.finish`` (summary.json),
``python -m trainkit.report`` and ``python -m trainkit.bench spot`` all account with these.

- ``useful_s``: for every record in the *final* metrics (the lead drops steps a crashed attempt
  logged after its last checkpoint, so each step appears once), the step time less its data
  wait and checkpoint blocking, × the number of steps the record covers. A record covers the
  steps since the previous record of the same attempt, or, for an attempt's first record,
  since the step the attempt started from.
- ``wall_s``: from the first attempt's beginning (its ``Run`` was made: ``start``'s
  ``startup_s`` before its ``start`` event) to the last thing the run wrote (its ``finish``
  event when it finished; otherwise the last event or metrics record).
- ``goodput = useful_s / wall_s``; ``steady_goodput``: the same steps at the median step time
  over the wall time (below goodput when steps were slower than usual).
- ``badput_s``: the rest of the wall time, in buckets that add up with ``useful_s`` to
  ``wall_s`` exactly (``other`` takes what no bucket explains, and is reported):

  ``startup``         an attempt's beginning -> its ``start`` event, less its restore
  ``restore``         loading the checkpoint (``restore``'s ``load_s``)
  ``checkpoint_save`` training blocked on saves: inside steps (``checkpoint_block_s``) and
                      the final save after the last step
  ``data_wait``       steps waiting for their batch (``data_wait_s``)
  ``recompute``       a crashed attempt's work after its last kept record (the records a
                      restore dropped: ``dropped_until``); the next attempt does it again
  ``emergency_save``  a preempted attempt's last step -> its ``preempted`` event
  ``downtime``        an attempt's end -> the next one's beginning: waiting for capacity,
                      failure detection, relaunch
  ``membership``      ``ft.mode=replicas``: steps' time lost to a change of membership
                      (``ft_stall_s``: tries redone after a group loss, a heartbeat expiring,
                      a replacement awaited) while the other groups went on
  ``other``           the rest: finishing (export), steps no record covers, timer skew

  A crash is seen at its last sign of life; the time from there to the kill lands in
  ``downtime``. ``interruption_s`` sums what interruptions cost: the restarted attempts'
  start-up and restore, and the recompute, emergency saves and downtime they caused.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trainkit import rundir


def final_metrics(metrics: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records with a step, sorted by step; a step logged twice keeps its last record."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in metrics:
        if isinstance(record.get("step"), (int, float)):
            by_step[int(record["step"])] = dict(record)
    return [by_step[s] for s in sorted(by_step)]


def _t(record: Mapping[str, Any]) -> float | None:
    value = record.get("time")
    return float(value) if isinstance(value, (int, float)) else None


def covered_steps(metrics: list[Mapping[str, Any]], start_steps: Mapping[Any, int]) -> list[int]:
    """How many optimizer steps each record of ``final_metrics`` stands for."""
    out: list[int] = []
    prev_step: int | None = None
    prev_attempt: Any = object()
    for record in metrics:
        step = int(record["step"])
        attempt = record.get("attempt")
        if prev_step is not None and attempt == prev_attempt:
            base = prev_step
        else:
            base = start_steps.get(attempt, prev_step if prev_step is not None else 0)
            if prev_step is not None:
                base = max(base, prev_step)  # never count a step twice
        out.append(max(0, step - base))
        prev_step, prev_attempt = step, attempt
    return out


def _num(record: Mapping[str, Any] | None, key: str) -> float | None:
    value = (record or {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def attempts(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One dict per ``start`` event, in time order: ``attempt``, ``start`` and ``next_start``
    (times; ``inf`` for the last), ``began`` (when its ``Run`` was made: ``startup_s`` before
    ``start``; without that field, when its restore began, else ``start``), ``start_step``,
    ``restore`` (the ``restore`` event that led to it, at or before its start), ``terminal``
    (its ``preempted``/``finish`` event, if any) and ``inside`` (its other events; a restore
    belongs to the attempt after it)."""
    timed = sorted((e for e in events if _t(e) is not None), key=lambda e: _t(e))  # type: ignore[arg-type,return-value]
    times = [_t(e) for e in timed]
    starts = [e for e in timed if e.get("event") == rundir.START.name]
    out: list[dict[str, Any]] = []
    # Each attempt's events are a slice of the time-sorted list: a month of records with an
    # interruption every few hours stays O(records log records), not O(records x attempts).
    for i, start in enumerate(starts):
        t0 = _t(start)
        t1 = _t(starts[i + 1]) if i + 1 < len(starts) else math.inf
        t_prev = _t(starts[i - 1]) if i else -math.inf
        span = timed[bisect.bisect_left(times, t0):bisect.bisect_left(times, t1)]  # type: ignore[arg-type]
        inside = [e for e in span if e is not start and e.get("event") != rundir.RESTORE.name]
        before = timed[bisect.bisect_right(times, t_prev):bisect.bisect_right(times, t0)]  # type: ignore[arg-type]
        restores = [e for e in before if e.get("event") == rundir.RESTORE.name]
        restore = restores[-1] if restores else None
        startup = _num(start, "startup_s")
        if startup is not None:
            began = t0 - max(0.0, startup)  # type: ignore[operator]
        elif restore is not None:
            began = min(t0, _t(restore) - (_num(restore, "load_s") or 0.0))  # type: ignore[operator,type-var]
        else:
            began = t0
        out.append({
            "attempt": start.get("attempt", i), "start": t0, "next_start": t1, "began": began,
            "start_step": int(start.get("step") or 0),
            "world_size": start.get("world_size"), "nodes": start.get("nodes"),
            "restore": restore,
            "terminal": next((e for e in inside if e.get("event") in rundir.TERMINAL), None),
            "inside": inside,
        })
    return out


def attempt_spans(metrics: list[Mapping[str, Any]], events: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One dict per attempt: ``attempt, began, start, loop_end, end, start_step, end_step, status,
    world_size, nodes`` (the last two from its ``start`` event, None when it has none).

    ``status`` is ``finished``, ``preempted``, ``crashed`` (a later attempt started and this
    one wrote no ``preempted``/``finish`` event: it was killed or failed) or ``incomplete``
    (the last attempt, without an ending: still running, or died and never relaunched).
    ``loop_end`` is its last kept metrics record (``start`` when none). A crashed attempt's
    ``end`` is its last sign of life: last event or metrics record before the next attempt
    began, the dropped records included (``restore``'s ``dropped_until``). ``began`` is never
    before the previous attempt's ``end``.
    """
    found = attempts(events)
    spans: list[dict[str, Any]] = []
    if not found:
        # No events (an old or partial run dir): one span per attempt seen in the metrics.
        groups: dict[Any, list[Mapping[str, Any]]] = {}
        for r in metrics:
            if _t(r) is not None:
                groups.setdefault(r.get("attempt", 0), []).append(r)
        prev_step = 0
        for i, (attempt, rows) in enumerate(sorted(groups.items(), key=lambda kv: _t(kv[1][0]) or 0.0)):
            first = rows[0]
            # The attempt began about (steps its first record covers) × step_time_s before it.
            n = max(1, int(first["step"]) - prev_step)
            t0 = _t(first) - n * float(first.get("step_time_s") or 0.0)  # type: ignore[operator]
            prev_step = int(rows[-1]["step"])
            spans.append({"attempt": attempt if attempt is not None else i, "began": t0, "start": t0,
                          "loop_end": _t(rows[-1]), "end": _t(rows[-1]), "start_step": None,
                          "end_step": int(rows[-1]["step"]),
                          "status": "incomplete" if i == len(groups) - 1 else "crashed"})
        return spans
    by_attempt: dict[Any, list[Mapping[str, Any]]] = {}
    for r in metrics:
        if _t(r) is not None:
            by_attempt.setdefault(r.get("attempt"), []).append(r)
    # (time of the last dropped record, the step it reached): the crashed attempt's lost work.
    drops = [(_num(e, "dropped_until"), int(e.get("step") or 0) + int(e.get("recomputed_steps") or 0))
             for e in rundir.of(list(events), rundir.RESTORE)]
    drops = [(t, step) for t, step in drops if t is not None]
    for i, a in enumerate(found):
        t0, t1, inside, terminal = a["start"], a["next_start"], a["inside"], a["terminal"]
        limit = found[i + 1]["began"] if i + 1 < len(found) else math.inf
        rows = [r for r in by_attempt.get(a["attempt"], []) if t0 <= _t(r) < t1]  # type: ignore[operator]
        loop_end = max([t0, *(_t(r) for r in rows)])  # type: ignore[type-var]
        if terminal is not None:
            status = "finished" if terminal.get("event") == rundir.FINISH.name else "preempted"
            end = _t(terminal)
            end_step = terminal.get("step")
        else:
            status = "crashed" if i + 1 < len(found) else "incomplete"
            lost = [(t, step) for t, step in drops if t0 <= t < min(t1, limit)]  # type: ignore[operator]
            times = [_t(e) for e in inside if _t(e) < limit] + [_t(r) for r in rows] + [t for t, _ in lost]  # type: ignore[operator]
            end = max([t0, *times])  # type: ignore[type-var]
            steps = ([e.get("step") for e in inside if isinstance(e.get("step"), int) and _t(e) < limit]  # type: ignore[operator]
                     + [int(r["step"]) for r in rows] + [step for _, step in lost])
            end_step = max(steps) if steps else a["start_step"]
        began = a["began"] if not spans else max(a["began"], spans[-1]["end"])
        spans.append({"attempt": a["attempt"], "began": min(began, t0), "start": t0, "loop_end": loop_end,
                      "end": end, "start_step": a["start_step"], "end_step": end_step, "status": status,
                      "world_size": a["world_size"], "nodes": a["nodes"],
                      "_restore": a["restore"], "_inside": inside})
    return spans


BUCKETS = ("startup", "restore", "checkpoint_save", "data_wait", "recompute", "emergency_save", "downtime",
           "membership", "other")
# What tables and plots call them.
LABELS = {"useful": "useful steps", "startup": "start-up", "restore": "checkpoint restore",
          "checkpoint_save": "checkpoint save (blocking)", "data_wait": "data wait",
          "recompute": "recomputed after a failure", "emergency_save": "emergency save",
          "downtime": "downtime (waiting for capacity)", "membership": "group lost (replicas)", "other": "other"}
# What an interruption costs: charged to the attempt it ended, and to the restart after it.
ENDED_BY_INTERRUPTION = ("recompute", "emergency_save", "downtime")
RESTART = ("startup", "restore")


def _loop_parts(record: Mapping[str, Any], n: int) -> tuple[float, float, float, float]:
    """(useful, data wait, checkpoint blocking, membership stall) seconds of the ``n`` steps a
    record covers (``step_time_s`` leaves the stall out already)."""
    step = float(record.get("step_time_s") or 0.0)
    wait = max(0.0, float(record.get("data_wait_s") or 0.0))
    block = max(0.0, float(record.get("checkpoint_block_s") or 0.0))
    stall = max(0.0, float(record.get("ft_stall_s") or 0.0))
    return max(0.0, step - wait - block) * n, wait * n, block * n, stall * n


def _span_badput(span: dict[str, Any], next_began: float | None, loop: tuple[float, float, float]) -> dict[str, float]:
    """The buckets of one attempt (``other`` excluded); ``loop`` is its records' (data wait,
    checkpoint blocking, membership stall)."""
    out = dict.fromkeys(BUCKETS[:-1], 0.0)
    out["data_wait"], out["checkpoint_save"], out["membership"] = loop
    before = max(0.0, span["start"] - span["began"])
    load = _num(span["_restore"], "load_s") or 0.0
    out["restore"] = min(before, max(0.0, load))
    out["startup"] = before - out["restore"]
    after = max(0.0, span["end"] - span["loop_end"])
    if span["status"] == "preempted":
        out["emergency_save"] = after
    elif span["status"] == "crashed":
        out["recompute"] = after
    elif span["status"] == "finished":
        saves = [float(e.get("blocking_s") or 0.0) for e in span["_inside"]
                 if e.get("event") == rundir.CHECKPOINT.name and _t(e) > span["loop_end"]]  # type: ignore[operator]
        out["checkpoint_save"] += min(after, sum(saves))
    if next_began is not None:
        out["downtime"] = max(0.0, next_began - span["end"])
    return out


def goodput(metrics: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, Any]:
    """Goodput, badput and the run's interruption counts, from its metrics and events records.

    Returns ``useful_s``, ``wall_s``, ``goodput`` (``None`` if the wall time is unknown),
    ``steady_goodput``, ``median_step_s``, ``useful_steps``, ``badput_s`` (bucket -> seconds,
    see the module doc), ``interruption_s``, ``attempts``, ``preemptions``, ``crashes``,
    ``recomputed_steps``, ``checkpoints``, ``checkpoint_blocking_s`` (the saves' own
    ``blocking_s``), ``steps`` (last logged step), ``finished`` and ``spans``
    (:func:`attempt_spans`, each with its ``useful_s``, ``badput_s`` and ``interruption_s``).
    """
    final = final_metrics(metrics)
    spans = attempt_spans(final, events)
    start_steps = {s["attempt"]: s["start_step"] for s in spans if s["start_step"] is not None}
    covered = covered_steps(final, start_steps)
    parts = [_loop_parts(r, n) for r, n in zip(final, covered)]
    useful = sum(p[0] for p in parts)

    times = [t for t in (_t(x) for x in [*final, *events]) if t is not None]
    wall = max(times) - min(s["began"] for s in spans) if spans and times else 0.0
    # Each record's loop time goes to the attempt that logged it.
    loops: dict[Any, list[float]] = {}
    for r, (used, wait, block, stall) in zip(final, parts):
        loop = loops.setdefault(r.get("attempt"), [0.0, 0.0, 0.0, 0.0])
        loop[0] += wait
        loop[1] += block
        loop[2] += used
        loop[3] += stall
    badput = dict.fromkeys(BUCKETS, 0.0)
    interruption = 0.0
    for i, span in enumerate(spans):
        if "_inside" not in span:  # spans without events: only the loop is known
            span["badput_s"] = {}
            continue
        nxt = spans[i + 1]["began"] if i + 1 < len(spans) else None
        loop = loops.pop(span["attempt"], [0.0, 0.0, 0.0, 0.0])
        span["useful_s"] = loop[2]
        span["badput_s"] = _span_badput(span, nxt, (loop[0], loop[1], loop[3]))
        for k, v in span["badput_s"].items():
            badput[k] += v
        lost = sum(span["badput_s"][k] for k in RESTART) if i else 0.0
        if span["status"] in ("preempted", "crashed"):
            lost += sum(span["badput_s"][k] for k in ENDED_BY_INTERRUPTION)
        span["interruption_s"] = lost
        interruption += lost
    for wait, block, _, stall in loops.values():  # records of attempts no start event names
        badput["data_wait"] += wait
        badput["checkpoint_save"] += block
        badput["membership"] += stall
    badput["other"] = wall - useful - sum(badput.values())
    steps_done = sum(covered)
    median = statistics.median(float(r.get("step_time_s") or 0.0) for r in final) if final else 0.0

    kinds = [e.get("event") for e in events]
    checkpoints = rundir.of(events, rundir.CHECKPOINT)
    steps = int(final[-1]["step"]) if final else max(
        (int(e["step"]) for e in events if isinstance(e.get("step"), int)), default=0)
    return {
        "useful_s": useful,
        "wall_s": wall,
        "goodput": useful / wall if wall > 0 else None,
        "steady_goodput": median * steps_done / wall if wall > 0 else None,
        "median_step_s": median,
        "useful_steps": steps_done,
        "badput_s": badput,
        "interruption_s": interruption,
        "attempts": len(spans),
        "preemptions": kinds.count(rundir.PREEMPTED.name),
        "crashes": sum(1 for s in spans if s["status"] == "crashed"),
        "recomputed_steps": int(sum(int(e.get("recomputed_steps") or 0) for e in rundir.of(events, rundir.RESTORE))),
        "checkpoints": len(checkpoints),
        "checkpoint_blocking_s": float(sum(float(e.get("blocking_s") or 0.0) for e in checkpoints)),
        "steps": steps,
        "finished": bool(spans) and spans[-1]["status"] == "finished",
        "spans": [{k: v for k, v in s.items() if not k.startswith("_")} for s in spans],
    }


def mean_samples_per_s(metrics: list[dict[str, Any]], useful_s: float, covered: list[int]) -> float | None:
    """Samples processed in the final metrics over the time spent on them."""
    samples = sum(float(r.get("samples_per_s") or 0.0) * float(r.get("step_time_s") or 0.0) * n
                  for r, n in zip(metrics, covered))
    return samples / useful_s if useful_s > 0 and samples > 0 else None
