"""``bench spot --modes replicas``: the spot schedule against ``ft.mode=replicas`` on Ray.

Two replica groups (``ft.groups=2 launcher.workers=1``), one Ray Train worker each, through
:mod:`trainkit.ft.ray`. A drain of a group's node is that group's notice: it leaves the
quorum, the survivor keeps training, and Ray replaces the group on another node, where it
heals from the survivor. A node kill drops the group after the heartbeat timeout; Ray
replaces it likewise. The run's ``metrics.jsonl`` is written from the groups' ledgers when
``fit()`` returns, so while the job runs the bench follows the ledgers (:class:`LedgerTail`),
and after it reads each event's course from them (:func:`event_rows`).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainkit import rundir

GROUPS = 2
# Durable state for the case where every group is lost, at about the restart mode's 5 s
# (the replicas loop checkpoints by steps only): what the run writes, not what it heals from.
CHECKPOINT_EVERY_STEPS = 150
OVERRIDES = ["ft.mode=replicas", f"ft.groups={GROUPS}", "launcher.workers=1", "checkpoint.every_seconds=0",
             f"checkpoint.every_steps={CHECKPOINT_EVERY_STEPS}"]

Record = Mapping[str, Any]


def _commit(record: Record) -> bool:
    return "loss" in record and "rank" in record


class LedgerTail(threading.Thread):
    """Follows the groups' ledgers while the job runs: which process is which group, and
    whether every group trains again after the last event (the next one may fire then)."""

    def __init__(self, run_dir: Path, groups: int = GROUPS, every_s: float = 0.5) -> None:
        super().__init__(name="trainkit-spot-ledgers", daemon=True)
        self.paths = [run_dir / rundir.ft_ledger(g) for g in range(groups)]
        self.groups = groups
        self.every_s = every_s
        self.group_of_pid: dict[int, int] = {}
        self.started: dict[int, float] = {}  # group -> its newest start
        self.full_at: float | None = None  # the newest commit every group took part in
        self._offsets = [0] * groups
        self._struck: tuple[int, float] | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        for g, path in enumerate(self.paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self._offsets[g])
                    data = f.read()
            except FileNotFoundError:
                continue
            complete = data[: data.rfind(b"\n") + 1]
            self._offsets[g] += len(complete)
            for r in rundir.parse_jsonl(complete.decode("utf-8", "replace"), str(path), warn=False):
                if r.get("event") == "start":
                    self.group_of_pid[int(r["pid"])] = g
                    self.started[g] = float(r["time"])
                elif _commit(r) and int(r["participants"]) == self.groups and not r.get("window"):
                    self.full_at = max(float(r["time"]), self.full_at or 0.0)

    def mark(self, pid: int, at: float) -> bool:
        """The event at ``at`` struck ``pid``'s group; False while the pid is in no ledger yet."""
        group = self.group_of_pid.get(pid)
        if group is None:
            return False
        self._struck = (group, at)
        return True

    def training_again(self) -> bool:
        """Every group committed together since the struck group's replacement started."""
        if self.full_at is None:
            return False
        if self._struck is None:
            return True
        group, at = self._struck
        start = self.started.get(group, 0.0)
        return start > at and self.full_at > start

    def stop(self) -> None:
        self._done.set()
        if self.ident is not None:
            self.join()
        self.poll()


def event_rows(ledgers: Mapping[int, Sequence[Record]], final: Sequence[Record], fired: Sequence[Mapping[str, Any]],
               t_launch: float, median_step_s: float, groups: int = GROUPS) -> list[dict[str, Any]]:
    """One row per fired event, from the ledgers: how the struck group went (its notice, its
    leave, its replacement's start, heal and first step with everybody) and what the others
    lost meanwhile: the membership stall (``ft_stall_s``: redone tries, a heartbeat expiring)
    and the capacity of the steps trained short of a group (their time beyond the median step)."""
    rows = []
    for event in sorted(fired, key=lambda f: float(f["fired_at"])):
        t = float(event["fired_at"])
        group = next((g for g, recs in ledgers.items() for r in recs
                      if r.get("event") == "start" and r.get("pid") == event.get("pid")), None)
        row: dict[str, Any] = {"kind": event["kind"], "planned_s": event.get("planned_s"), "fired_s": t - t_launch,
                               "group": group}
        if group is None:
            rows.append(row)
            continue
        mine = [r for r in ledgers[group] if float(r.get("time", 0)) >= t]

        def first(pred: Any, records: Sequence[Record] = mine) -> Record | None:
            return next((r for r in records if pred(r)), None)

        leaving = first(lambda r: r.get("event") == "leaving")
        left = first(lambda r: r.get("event") == "left")
        start = first(lambda r: r.get("event") == "start")
        healed = first(lambda r: r.get("event") == "healed" and float(r["time"]) >= float(start["time"])) \
            if start else None
        back = first(lambda r: _commit(r) and int(r["participants"]) == groups
                     and float(r["time"]) >= float(healed["time"])) if healed else None
        end = float(back["time"]) if back else float("inf")
        others = sorted((r for g, recs in ledgers.items() if g != group for r in recs
                         if t <= float(r.get("time", 0)) <= end), key=lambda r: float(r["time"]))
        short = first(lambda r: _commit(r) and int(r["participants"]) < groups, others)
        stall = capacity = 0.0
        steps_short = 0
        prev_step = None
        for rec in final:
            step, at = int(rec["step"]), float(rec["time"])
            n = step - prev_step if prev_step is not None else 1
            prev_step = step
            if not t < at <= end:
                continue
            stall += float(rec.get("ft_stall_s") or 0.0) * n
            if float(rec.get("ft_groups") or groups) < groups:
                steps_short += n
                capacity += max(0.0, float(rec.get("step_time_s") or 0.0) - median_step_s) * n

        def since(r: Record | None) -> float | None:
            return float(r["time"]) - t if r is not None else None

        row.update({
            "notice_to_leaving_s": since(leaving) if event["kind"] == "drain" else None,
            "notice_to_left_s": since(left) if event["kind"] == "drain" else None,
            "to_survivor_short_commit_s": since(short),
            "redone_tries": sum(1 for r in others if r.get("redo")),
            "to_replacement_start_s": since(start),
            "to_healed_s": since(healed),
            "healed_from": healed.get("source") if healed else None,
            "to_all_groups_s": since(back),
            "steps_short": steps_short,
            "stall_s": stall,
            "short_capacity_s": capacity,
            "cost_s": stall + capacity,
        })
        rows.append(row)
    return rows
