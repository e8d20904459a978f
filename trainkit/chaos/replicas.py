"""Chaos for ``ft.mode=replicas``: faults that take one replica group at a time, or all of them.

Kinds (each delivered once the run is seen at its step, the next only once every group is
back in the quorum, so no two overlap):

- ``kill-group``: SIGKILL of one group's process (the supervisor replaces it; it heals from a
  live peer);
- ``notice-group``: SIGTERM to one group's process, a spot notice (it leaves the quorum
  deliberately, the supervisor replaces it);
- ``kill-all-groups``: SIGKILL of every group at once (no live peer: the replacements restore
  the committed checkpoint and redo the steps since);
- ``kill-launch``: SIGKILL of the whole launch, supervisor and lighthouse included (a lost
  machine); the same command is launched again and resumes from the checkpoint.

Then it checks, from the groups' ledgers (:func:`trainkit.ft.ledger.account`), that every
position of every step was trained exactly once in the final model, that the sample ids are
those of the uninterrupted order (none twice, none skipped), and that the per-step losses stay within ``tolerance`` of an uninterrupted run
(:func:`trainkit.ft.loop.reference_losses`: the same steps by one group, no torchft; with two
groups any membership history matches it bitwise, with more to float rounding).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from trainkit import rundir

KINDS = ("kill-group", "notice-group", "kill-all-groups", "kill-launch")


@dataclass
class Fault:
    kind: str
    at_step: int
    group: int | None = None  # the group a one-group fault takes


@dataclass
class Delivered:
    fault: Fault
    step: int  # the last committed step when it struck
    recovered: bool  # every group was back in the quorum before the next fault (or the end)


@dataclass
class Report:
    delivered: list[Delivered] = field(default_factory=list)
    launches: list[int] = field(default_factory=list)  # each launch's exit code
    exactly_once: bool = False
    max_loss_diff: float | None = None
    tolerance: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.exactly_once and self.max_loss_diff is not None and self.max_loss_diff <= self.tolerance
                and not self.problems)


def plan(kills: int, notices: int, all_kills: int, launch_kills: int, max_steps: int, groups: int,
         rng: random.Random, *, margin: int = 1) -> list[Fault]:
    """The faults at sorted random steps in ``[2, max_steps - margin]``, one-group faults on a
    random group."""
    kinds = (["kill-group"] * kills + ["notice-group"] * notices + ["kill-all-groups"] * all_kills
             + ["kill-launch"] * launch_kills)
    rng.shuffle(kinds)
    steps = sorted(rng.randint(2, max(2, max_steps - margin)) for _ in kinds)
    return [Fault(k, s, rng.randrange(groups) if k.endswith("-group") else None) for k, s in zip(kinds, steps)]


def committed(run_dir: str, groups: int) -> list[dict[str, Any]]:
    """Every commit record of every group, oldest first."""
    from trainkit.ft.ledger import read

    records = [r for rs in read(run_dir, groups).values() for r in rs if "loss" in r]
    return sorted(records, key=lambda r: r["time"])


def group_processes(launch: psutil.Process) -> dict[int, psutil.Process]:
    """The replica groups' processes under a launch (``python -m trainkit.ft CONFIG GROUP``)."""
    out = {}
    for child in launch.children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "trainkit.ft" in cmd and cmd.index("trainkit.ft") > 0 and cmd[cmd.index("trainkit.ft") - 1] == "-m":
            out[int(cmd[-1])] = child
    return out


class ReplicaHarness:
    def __init__(self, overrides: list[str], workdir: str, groups: int, env: dict[str, str] | None = None,
                 timeout: float = 900.0, poll_s: float = 0.02) -> None:
        self.overrides = overrides
        self.workdir = workdir
        self.groups = groups
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.timeout = timeout
        self.poll_s = poll_s
        self.run_dir = os.path.join(workdir, "chaos")

    def _start(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "trainkit.launch", *self.overrides, f"run_dir={self.run_dir}",
               "trainer.progress=plain"]
        log = open(os.path.join(self.workdir, "launch.log"), "ab")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def _last_step(self) -> int:
        commits = committed(self.run_dir, self.groups)
        return max((int(r["step"]) for r in commits), default=-1)

    def _wait_step(self, proc: subprocess.Popen[bytes], step: int) -> bool:
        deadline = time.monotonic() + self.timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if self._last_step() >= step:
                return True
            time.sleep(self.poll_s)
        return False

    def _wait_all_back(self, proc: subprocess.Popen[bytes], since: float, struck: list[int]) -> bool:
        """Until every struck group has started again after ``since`` and a step after those
        starts was committed by a quorum of every group (False: the run ended first). A step
        in a leave window has every group too, but the leaver is still on its way out."""
        from trainkit.ft.ledger import read

        deadline = time.monotonic() + self.timeout
        while proc.poll() is None and time.monotonic() < deadline:
            ledgers = read(self.run_dir, self.groups)
            starts = [max((r["time"] for r in ledgers[g] if r.get("event") == "start" and r["time"] > since),
                          default=None) for g in struck]
            if all(t is not None for t in starts):
                back = max(starts)  # type: ignore[type-var]
                if any(r["time"] > back and r.get("participants") == self.groups and "loss" in r
                       and not r.get("window") for rs in ledgers.values() for r in rs):
                    return True
            time.sleep(self.poll_s)
        return False

    def _strike(self, proc: subprocess.Popen[bytes], fault: Fault) -> bool:
        """Delivers ``fault``; False when there was nothing left to strike."""
        if fault.kind == "kill-launch":
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        deadline = time.monotonic() + self.timeout
        while proc.poll() is None and time.monotonic() < deadline:
            procs = group_processes(psutil.Process(proc.pid))
            if fault.kind == "kill-all-groups" and len(procs) == self.groups:
                for p in procs.values():
                    p.kill()
                return True
            if fault.kind != "kill-all-groups" and fault.group in procs:
                procs[fault.group].send_signal(signal.SIGKILL if fault.kind == "kill-group" else signal.SIGTERM)
                return True
            time.sleep(self.poll_s)
        return False

    def run(self, faults: list[Fault]) -> Report:
        report = Report()
        pending = list(faults)
        proc = self._start()
        while True:
            fault = pending.pop(0) if pending else None
            if fault is None:
                report.launches.append(proc.wait(self.timeout))
                return report
            fault.at_step = max(fault.at_step, self._last_step() + 1)
            if not self._wait_step(proc, fault.at_step):
                report.problems.append(f"the run ended or stalled before step {fault.at_step} ({fault.kind})")
                report.launches.append(proc.wait(self.timeout))
                return report
            struck_at = time.time()
            step = self._last_step()
            if not self._strike(proc, fault):
                report.problems.append(f"{fault.kind} at step {fault.at_step}: no group process to strike")
                continue
            if fault.kind == "kill-launch":
                report.launches.append(proc.returncode)
                proc = self._start()
            struck = list(range(self.groups)) if fault.group is None else [fault.group]
            report.delivered.append(Delivered(fault, step, self._wait_all_back(proc, struck_at, struck)))


def check(report: Report, run_dir: str, cfg: Any, reference: list[float], tolerance: float) -> Report:
    """Exactly-once data and the loss bound, from the ledgers (fills ``report``)."""
    from trainkit.data import Stream
    from trainkit.errors import TrainkitError
    from trainkit.ft.ledger import account
    from trainkit.tasks import TASKS
    from trainkit.tasks.base import default_url

    report.tolerance = tolerance
    if not report.launches or report.launches[-1] != 0:
        report.problems.append(f"the last launch exited {report.launches[-1:] or 'never'}; see launch.log")
        return report
    steps, batch = cfg.trainer.max_steps, cfg.data.batch_size
    try:
        acc = account(run_dir, groups=cfg.ft.groups, steps=steps, batch=batch, workers=cfg.launcher.workers)
    except TrainkitError as exc:
        report.problems.append(f"exactly-once violated: {exc}")
        return report
    # The final membership's chunks tile every step (account); so must the sample ids they map to.
    stream = Stream(cfg.data.url or default_url(TASKS.get(cfg.task, "task"), cfg.model))
    ids = [int(i) for commits in acc.final for c in commits for lo, hi in c["chunks"]
           for i in stream.ids_at(cfg.seed, lo, hi)]
    # The same multiset as the uninterrupted order's (an id recurs only once per epoch there).
    expected = [int(i) for i in stream.ids_at(cfg.seed, 0, steps * batch)]
    report.exactly_once = sorted(ids) == sorted(expected)
    if not report.exactly_once:
        report.problems.append(f"the final model trained {len(ids)} samples ({len(set(ids))} distinct), the "
                               f"uninterrupted order has {len(expected)} ({len(set(expected))} distinct)")
    report.max_loss_diff = max((abs(a - b) for a, b in zip(acc.losses, reference)), default=0.0)
    summary = rundir.read_summary(run_dir) or {}
    if not summary.get("ft", {}).get("exactly_once"):
        report.problems.append("summary.json does not say exactly_once")
    return report


def main(own: list[str], overrides: list[str]) -> int:
    import argparse

    from trainkit.config import load_config
    from trainkit.ft.loop import reference_losses
    from trainkit.launch.compose import compose_config

    p = argparse.ArgumentParser(prog="python -m trainkit.chaos (ft.mode=replicas)")
    p.add_argument("--kills", type=int, default=2, help="SIGKILLs of one group")
    p.add_argument("--notices", type=int, default=1, help="SIGTERMs (spot notices) to one group")
    p.add_argument("--all-kills", type=int, default=1, help="SIGKILLs of every group at once")
    p.add_argument("--launch-kills", type=int, default=0, help="SIGKILLs of the whole launch (relaunched)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/chaos")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |loss - uninterrupted| per step (default: 0 with 2 groups, 1e-5 with more)")
    args = p.parse_args(own)
    cfg = load_config(compose_config(overrides).to_dict())
    os.makedirs(args.workdir, exist_ok=True)
    faults = plan(args.kills, args.notices, args.all_kills, args.launch_kills, cfg.trainer.max_steps, cfg.ft.groups,
                  random.Random(args.seed), margin=max(2, cfg.trainer.max_steps // 5))
    print(f"chaos run (ft.mode=replicas, {cfg.ft.groups} groups) with {len(faults)} faults: "
          + ", ".join(f"{f.kind}{'' if f.group is None else f'({f.group})'}@{f.at_step}" for f in faults), flush=True)
    harness = ReplicaHarness(overrides, args.workdir, cfg.ft.groups)
    report = harness.run(faults)
    print(f"uninterrupted reference ({cfg.trainer.max_steps} steps, in this process) ...", flush=True)
    reference = reference_losses(cfg.to_dict())
    tolerance = args.tolerance if args.tolerance is not None else (0.0 if cfg.ft.groups == 2 else 1e-5)
    check(report, harness.run_dir, cfg, reference, tolerance)
    for d in report.delivered:
        who = "" if d.fault.group is None else f" group {d.fault.group}"
        print(f"  {d.fault.kind + who:28s} at step {d.step:5d}  all groups back: {d.recovered}"
              + ("" if d.recovered else " (the run ended first: a longer run shows the rejoin)"))
    print(f"launch exit codes: {report.launches}  exactly once: {report.exactly_once}  "
          f"max |loss - uninterrupted|: {report.max_loss_diff} (tolerance {report.tolerance})")
    for problem in report.problems:
        print(f"  PROBLEM: {problem}")
    return 0 if report.ok else 1
