"""Goodput: the share of a run's wall-clock time spent on steps that count.

Pure functions over the parsed ``metrics.jsonl`` and ``events.jsonl`` records; no I/O, so they
can be tested on hand-built logs whose right answer is known.

- ``useful_s``: for every record in the *final* metrics (the lead drops steps a crashed attempt
  logged after its last checkpoint, so each step appears once), ``step_time_s`` × the number of
  steps the record covers. A record covers the steps since the previous record of the same
  attempt, or, for an attempt's first record, since the step the attempt started from.
- ``wall_s``: from the first ``start`` event to the last thing the run wrote (its ``finish``
  event when it finished; otherwise the last event or metrics record).
- ``goodput = useful_s / wall_s``. Everything else is overhead: process start-up and restore,
  checkpoint saves outside the step loop, steps recomputed after a crash, and the downtime
  between an attempt's death and the next start.
"""

from __future__ import annotations

import bisect
import math
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


def attempts(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One dict per ``start`` event, in time order: ``attempt``, ``start`` and ``next_start``
    (times; ``inf`` for the last), ``start_step``, ``restore`` (the ``restore`` event that led
    to it, at or before its start), ``terminal`` (its ``preempted``/``finish`` event, if any)
    and ``inside`` (its other events; a restore belongs to the attempt after it)."""
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
        out.append({
            "attempt": start.get("attempt", i), "start": t0, "next_start": t1,
            "start_step": int(start.get("step") or 0),
            "restore": restores[-1] if restores else None,
            "terminal": next((e for e in inside if e.get("event") in rundir.TERMINAL), None),
            "inside": inside,
        })
    return out


def attempt_spans(metrics: list[Mapping[str, Any]], events: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One dict per attempt: ``attempt, start, end, start_step, end_step, status``.

    ``status`` is ``finished``, ``preempted``, ``crashed`` (a later attempt started and this
    one wrote no ``preempted``/``finish`` event: it was killed or failed) or ``incomplete``
    (the last attempt, without an ending: still running, or died and never relaunched).
    A crashed attempt's ``end`` is its last sign of life (last event or metrics record).
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
            spans.append({"attempt": attempt if attempt is not None else i, "start": t0, "end": _t(rows[-1]),
                          "start_step": None, "end_step": int(rows[-1]["step"]),
                          "status": "incomplete" if i == len(groups) - 1 else "crashed"})
        return spans
    by_attempt: dict[Any, list[Mapping[str, Any]]] = {}
    for r in metrics:
        if _t(r) is not None:
            by_attempt.setdefault(r.get("attempt"), []).append(r)
    for i, a in enumerate(found):
        t0, t1, inside, terminal = a["start"], a["next_start"], a["inside"], a["terminal"]
        rows = [r for r in by_attempt.get(a["attempt"], []) if t0 <= _t(r) < t1]  # type: ignore[operator]
        if terminal is not None:
            status = "finished" if terminal.get("event") == rundir.FINISH.name else "preempted"
            end = _t(terminal)
            end_step = terminal.get("step")
        else:
            status = "crashed" if i + 1 < len(found) else "incomplete"
            times = [_t(e) for e in inside] + [_t(r) for r in rows]
            end = max([t0, *times])  # type: ignore[type-var]
            steps = [e.get("step") for e in inside if isinstance(e.get("step"), int)] + [int(r["step"]) for r in rows]
            end_step = max(steps) if steps else a["start_step"]
        spans.append({"attempt": a["attempt"], "start": t0, "end": end, "start_step": a["start_step"],
                      "end_step": end_step, "status": status})
    return spans


def goodput(metrics: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, Any]:
    """Goodput and the run's interruption counts, from its metrics and events records.

    Returns ``useful_s``, ``wall_s``, ``goodput`` (``None`` if the wall time is unknown),
    ``attempts``, ``preemptions``, ``crashes``, ``recomputed_steps``, ``checkpoints``,
    ``checkpoint_blocking_s``, ``steps`` (last logged step), ``finished`` and ``spans``
    (:func:`attempt_spans`).
    """
    final = final_metrics(metrics)
    spans = attempt_spans(final, events)
    start_steps = {s["attempt"]: s["start_step"] for s in spans if s["start_step"] is not None}
    covered = covered_steps(final, start_steps)
    useful = sum(float(r.get("step_time_s") or 0.0) * n for r, n in zip(final, covered))

    times = [t for t in (_t(x) for x in [*final, *events]) if t is not None]
    if spans and times:
        t0 = min(s["start"] for s in spans)
        wall = max(times) - t0
    else:
        wall = 0.0
    kinds = [e.get("event") for e in events]
    checkpoints = rundir.of(events, rundir.CHECKPOINT)
    steps = int(final[-1]["step"]) if final else max(
        (int(e["step"]) for e in events if isinstance(e.get("step"), int)), default=0)
    return {
        "useful_s": useful,
        "wall_s": wall,
        "goodput": useful / wall if wall > 0 else None,
        "attempts": len(spans),
        "preemptions": kinds.count(rundir.PREEMPTED.name),
        "crashes": sum(1 for s in spans if s["status"] == "crashed"),
        "recomputed_steps": int(sum(int(e.get("recomputed_steps") or 0) for e in rundir.of(events, rundir.RESTORE))),
        "checkpoints": len(checkpoints),
        "checkpoint_blocking_s": float(sum(float(e.get("blocking_s") or 0.0) for e in checkpoints)),
        "steps": steps,
        "finished": bool(spans) and spans[-1]["status"] == "finished",
        "spans": spans,
    }


def mean_samples_per_s(metrics: list[dict[str, Any]], useful_s: float, covered: list[int]) -> float | None:
    """Samples processed in the final metrics over the time spent on them."""
    samples = sum(float(r.get("samples_per_s") or 0.0) * float(r.get("step_time_s") or 0.0) * n
                  for r, n in zip(metrics, covered))
    return samples / useful_s if useful_s > 0 and samples > 0 else None
