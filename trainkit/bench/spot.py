"""Goodput of a ``launcher=ray`` job under a simulated spot schedule.

    python -m trainkit.bench spot [--modes restart,replicas] [--minutes 12] [--drain-every 180] \\
        [--kill-every 420] [--seed 0] [--markdown FILE] [key=value ...]

Each mode in ``--modes`` runs the same seeded schedule, one after the other, on a fresh
cluster: ``restart`` (the default fault handling, below) and ``replicas`` (``ft.mode=replicas``
with two replica groups, :mod:`trainkit.bench.spot_replicas`: a drain becomes the group's
notice-backed leave, a kill drops the group, and Ray replaces only that group, which heals
from its live peer). A loopback Ray cluster runs the recipe with ``launcher=ray``, checkpointing every 5 s: a
0-CPU head (GCS, driver, Ray Train's controller) with the GCS health checks of
``SPOT_SYSTEM_CONFIG``, one 1-CPU node per worker and ``--spare`` idle nodes (a cluster
kept one node above what the job needs, so a restart need not wait for a new instance).
The bench carries out a seeded schedule:

* ``drain``: a spot notice. The node of a training worker is drained with a deadline
  (``--grace``), which trainkit turns into an agreed stop step, an emergency checkpoint and
  exit 75; Ray restarts the group away from the draining node. The drained node is removed
  without grace at its deadline (the instance is reclaimed).
* ``kill``: a node hosting a worker is removed without notice (SIGKILL of its raylet and
  workers); Ray's failure handling restarts the group and it resumes from the latest
  committed checkpoint.

Either way a replacement node joins ``--replace-after`` seconds after the event (the cloud's
new instance). An event fires at its time once the job is training again after the
previous one, so no restart is measured twice. Goodput is useful step time over the wall
time from launching the job to its exit, accounted as the run report accounts (the same
badput buckets); :mod:`trainkit.bench.spot_account` says exactly what counts. A short check
of the whole path: ``--minutes 2 --schedule drain@40,kill@80``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainkit import rundir
from trainkit.bench import report
from trainkit.bench.loopback import LoopbackCluster
from trainkit.bench import spot_replicas
from trainkit.bench.spot_account import account, history_problems
from trainkit.bench.spot_schedule import SpotEvent, format_schedule, make_schedule, parse_schedule
from trainkit.cost.goodput import BUCKETS, LABELS
from trainkit.launch.ray.session import SPOT_SYSTEM_CONFIG

# The resnet recipe as it ships (~33 ms a step on 2 CPU workers), logging every step so
# each step's time is on record, and a time-based checkpoint policy. The interval is the
# Young-Daly optimum for the default schedule, sqrt(2 x cost of a save x mean time between
# hard kills) = sqrt(2 x ~0.03 s x 420 s) ~ 5 s: a hard kill loses at most 5 s of steps,
# 2.5 s on average (drains lose none: they save on notice).
RECIPE = [
    "recipe=resnet", "strategy=ddp", "trainer.threads=1", "trainer.log_every=1", "trainer.progress=off",
    "trainer.loggers=[]", "checkpoint.every_steps=0", "checkpoint.every_seconds=5",
]
# The default recipe's optimizer steps per second on the project's 2-core machine (median
# step 31 ms on 2026-11-30), less ~10 % for restarts and slower steps; sizes the job to
# --minutes, so that every scheduled event hits a running job. Elsewhere pass --steps.
STEPS_PER_S = 28.0
MODES = ("restart", "replicas")


class MetricsTail(threading.Thread):
    """Keeps every metrics record the job writes, also those a restore drops later.

    Reads only what was appended since the last poll (the bench shares the CPUs with the
    job); a restore rewrites the file, which is noticed and read again from the start.
    """

    def __init__(self, path: Path, every_s: float = 0.5) -> None:
        super().__init__(name="trainkit-spot-tail", daemon=True)
        self.path = path
        self.every_s = every_s
        self.records: dict[tuple[Any, int], dict[str, Any]] = {}
        self.latest_attempt: int | None = None
        self._hit_attempt: int | None = None
        self._offset = 0
        self._last_line = b""
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                if self._offset and not self._unchanged(f):
                    self._offset, self._last_line = 0, b""
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        lines = complete.splitlines()
        if lines:
            self._last_line = lines[-1] + b"\n"
        for r in rundir.parse_jsonl(complete.decode("utf-8", "replace"), str(self.path), warn=False):
            if isinstance(r.get("step"), int):
                self.records.setdefault((r.get("attempt"), r["step"]), r)
                if isinstance(r.get("attempt"), int):
                    self.latest_attempt = max(r["attempt"], self.latest_attempt or 0)

    def mark(self, pid: int, at: float) -> bool:
        """An event struck the job's current attempt (whichever worker it hit)."""
        self._hit_attempt = self.latest_attempt
        return True

    def training_again(self) -> bool:
        """The job logged a step, in an attempt newer than the one the last event struck."""
        attempt = self.latest_attempt
        return attempt is not None and (self._hit_attempt is None or attempt > self._hit_attempt)

    def _unchanged(self, f: Any) -> bool:
        """Whether the file still holds, just before our offset, the last line we read."""
        start = self._offset - len(self._last_line)
        if start < 0:
            return False
        f.seek(start)
        return f.read(len(self._last_line)) == self._last_line

    def stop(self) -> None:
        self._done.set()
        if self.ident is not None:
            self.join()
        self.poll()


class SpotRunner:
    """Starts the job, carries out the schedule against the cluster, collects the records."""

    def __init__(self, cluster: LoopbackCluster, schedule: list[SpotEvent], *, grace_s: float,
                 replace_after_s: float, log: Callable[[str], None] = print) -> None:
        self.cluster = cluster
        self.schedule = list(schedule)
        self.grace_s = grace_s
        self.replace_after_s = replace_after_s
        self.log = log
        self.fired: list[dict[str, Any]] = []
        self._later: list[tuple[float, str, Callable[[], Any]]] = []

    def run(self, cmd: list[str], run_dir: Path, out: Path, timeout_s: float,
            tail: MetricsTail | spot_replicas.LedgerTail) -> dict[str, Any]:
        """``tail`` follows the job: the event whose time has come fires once it trains again."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(out, "w") as stdout:
            t_launch = time.time()
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, env=env)
            tail.start()
            try:
                pending = list(self.schedule)
                while proc.poll() is None:
                    if time.time() - t_launch > timeout_s:
                        raise TimeoutError(f"the job ran past {timeout_s:.0f} s; its output: {out}")
                    self._due()
                    if pending and tail.training_again() and time.time() >= t_launch + pending[0].at_s:
                        if self._fire(pending[0], t_launch, tail):
                            pending.pop(0)
                    time.sleep(0.1)
                t_end = time.time()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                tail.stop()
                self._due(everything=True)
        return {
            "exit_code": proc.returncode,
            "t_launch": t_launch,
            "t_end": t_end,
            "seen": list(tail.records.values()) if isinstance(tail, MetricsTail) else None,
            "final": rundir.read_metrics(str(run_dir)),
            "events": rundir.read_events(str(run_dir)),
            "not_fired": [str(e) for e in pending],
        }

    def _fire(self, event: SpotEvent, t_launch: float, tail: MetricsTail | spot_replicas.LedgerTail) -> bool:
        workers = sorted(self.cluster.worker_pids())
        pid = workers[event.victim % len(workers)] if workers else None
        node = self.cluster.node_of(pid) if pid is not None else None
        now = time.time()
        if node is None or not tail.mark(pid, now):
            return False  # the group is between restarts: try again on the next tick
        record = {"kind": event.kind, "planned_s": event.at_s, "fired_at": now, "node": node.node_id[:8],
                  "worker": event.victim % len(workers), "pid": pid}
        if event.kind == "drain":
            self.cluster.drain(node, self.grace_s)
            self._at(now + self.grace_s, f"reclaim drained node {node.node_id[:8]}",
                     lambda: self.cluster.remove(node, graceful=False))
        else:
            self.cluster.remove(node, graceful=False)
        self._at(now + self.replace_after_s, "replacement node joins", self.cluster.add)
        self.fired.append(record)
        self.log(f"[spot] {now - t_launch:7.1f} s  {event.kind} node {record['node']} (worker #{record['worker']})")
        return True

    def _at(self, when: float, what: str, action: Callable[[], Any]) -> None:
        self._later.append((when, what, action))
        self._later.sort(key=lambda item: item[0])
        self._due()

    def _due(self, everything: bool = False) -> None:
        while self._later and (everything or self._later[0][0] <= time.time()):
            _, _, action = self._later.pop(0)
            action()


def run_bench(schedule: list[SpotEvent], *, steps: int, workers: int = 2, spare: int = 1, grace_s: float = 30.0,
              replace_after_s: float = 30.0, overrides: list[str] = (), timeout_s: float = 3600.0,
              system_config: dict[str, Any] | None = None, mode: str = "restart",
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs one job under ``schedule`` in ``mode``; returns
    :func:`~trainkit.bench.spot_account.account`'s figures plus the run's identity and the
    checks of its history (``replicas``: one worker per replica group, ``workers`` groups)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    replicas = mode == "replicas"
    if replicas and workers != spot_replicas.GROUPS:
        raise ValueError(f"the replicas mode runs {spot_replicas.GROUPS} replica groups, one worker each")
    work = Path(tempfile.mkdtemp(prefix=f"trainkit-bench-spot-{mode}-"))
    run_dir, out = work / "run", work / "launch.log"
    cluster = LoopbackCluster(workers + spare, system_config=SPOT_SYSTEM_CONFIG if system_config is None
                              else system_config)
    try:
        shape = spot_replicas.OVERRIDES if replicas else [f"launcher.workers={workers}"]
        cmd = [sys.executable, "-m", "trainkit.launch", *RECIPE, f"trainer.max_steps={steps}", *shape,
               *overrides, "launcher=ray", f"launcher.address={cluster.address}", f"run_dir={run_dir}"]
        runner = SpotRunner(cluster, schedule, grace_s=grace_s, replace_after_s=replace_after_s, log=log)
        tail = spot_replicas.LedgerTail(run_dir) if replicas else MetricsTail(run_dir / rundir.METRICS)
        raw = runner.run(cmd, run_dir, out, timeout_s, tail)
    finally:
        cluster.shutdown()
    seen = raw["final"] if replicas else raw["seen"]  # a replicas run drops no record unless every group is lost
    result = account(raw["final"], seen, raw["events"], runner.fired, raw["t_launch"], raw["t_end"])
    if replicas:
        from trainkit.ft.ledger import read

        result["events"] = spot_replicas.event_rows(read(str(run_dir), spot_replicas.GROUPS), raw["final"],
                                                    runner.fired, raw["t_launch"], result["median_step_s"] or 0.0)
        result["summary_ft"] = (rundir.read_summary(str(run_dir)) or {}).get("ft")
    result.update({
        "mode": mode,
        "exit_code": raw["exit_code"],
        "history_problems": history_problems(raw["final"], steps),
        "planned": [str(e) for e in schedule],
        "not_fired": raw["not_fired"],
        "fired_events": [{k: v for k, v in f.items() if k not in ("fired_at", "pid")}
                         | {"fired_s": f["fired_at"] - raw["t_launch"]} for f in runner.fired],
        "max_steps": steps,
        "workers": workers,
        "spare_nodes": spare,
        "grace_s": grace_s,
        "replace_after_s": replace_after_s,
        "run_dir": str(run_dir),
        "launch_log": str(out),
    })
    return result


# -- reporting ---------------------------------------------------------------------------

def _f(value: Any, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def summary_lines(result: dict[str, Any]) -> list[str]:
    wall = result["wall_s"]
    lines = [f"**{result.get('mode', 'restart')}**: goodput {_f(result['goodput'], '.1%')}: useful step time {result['useful_s']:.1f} s of "
             f"{wall:.1f} s wall ({result['steps']} steps, {result['attempts']} attempts, "
             f"exit {result['exit_code']}); {_f(result['goodput_with_data_wait'], '.1%')} with data wait counted "
             "as useful, as this bench counted before it used the run report's accounting",
             f"steady-state goodput {_f(result['steady_goodput'], '.1%')}: the same steps at the median step time "
             f"({result['median_step_s'] * 1000:.1f} ms) over the wall time; "
             f"{_f(result['steady_goodput_training'], '.1%')} over the training span (the launch's start-up and "
             "exit left out)",
             ""]
    split = [["useful steps", f"{result['useful_s']:.1f}", f"{result['useful_s'] / wall:.1%}"]]
    names = {**LABELS, "exit": "launcher exit (after the run's last record)"}
    split += [[names[key], f"{result['split'][f'{key}_s']:.1f}", f"{result['split'][f'{key}_s'] / wall:.1%}"]
              for key in (*BUCKETS, "exit")]
    split.append(["(lost to the events: their recompute, saves, downtime, restarts)", f"{result['interruption_s']:.1f}",
                  f"{result['interruption_s'] / wall:.1%}"])
    lines += [report.table(["where the wall time went (launch -> exit)", "s", "share"], split), ""]
    lines.append(_replica_events(result["events"]) if result.get("mode") == "replicas" else _restart_events(result["events"]))
    if result["not_fired"]:
        lines.append(f"\nnot fired (the job ended first): {', '.join(result['not_fired'])}")
    if result["unscheduled_restarts"]:
        lines.append(f"\nrestarts no scheduled event explains: {result['unscheduled_restarts']}")
    if result["history_problems"]:
        lines.append(f"\nhistory problems: {'; '.join(result['history_problems'])}")
    return lines


def _restart_events(rows: list[dict[str, Any]]) -> str:
    events = [[f"{e['kind']} (planned {_f(e['planned_s'], 'g')} s)", f"{e['fired_s']:.1f}", _f(e["notice_to_stop_s"]),
               _f(e["to_first_step_s"]), _f(e["recomputed_steps"], "d"), f"{e['recompute_s']:.1f}",
               f"{e['emergency_save_s']:.1f}", f"{e['downtime_s']:.1f}", f"{e['startup_s']:.1f}",
               f"{e['restore_s']:.1f}", f"{e['cost_s']:.1f}"] for e in rows]
    return report.table(["event", "fired at s", "notice -> stop s", "-> first resumed step s", "steps recomputed",
                         "recompute s", "emergency save s", "downtime s", "start-up s", "restore s", "cost s"], events)


def _replica_events(rows: list[dict[str, Any]]) -> str:
    events = [[f"{e['kind']} (planned {_f(e['planned_s'], 'g')} s)", f"{e['fired_s']:.1f}", _f(e["group"], "d"),
               _f(e.get("notice_to_leaving_s")), _f(e.get("notice_to_left_s")),
               _f(e.get("to_survivor_short_commit_s"), ".2f"), _f(e.get("redone_tries"), "d"),
               _f(e.get("to_replacement_start_s")), _f(e.get("to_healed_s")), e.get("healed_from") or "-",
               _f(e.get("to_all_groups_s")), _f(e.get("steps_short"), "d"), _f(e.get("stall_s"), ".2f"),
               _f(e.get("short_capacity_s")), _f(e.get("cost_s"))] for e in rows]
    return report.table(["event", "fired at s", "group", "notice -> leaving s", "notice -> left s",
                         "-> survivor's first short commit s", "tries redone", "-> replacement start s",
                         "-> healed s", "healed from", "-> all groups s", "steps short a group", "stall s",
                         "short-step capacity s", "cost s"], events)


def comparison(results: list[dict[str, Any]]) -> str:
    """The modes side by side: goodput, steady-state goodput and the badput buckets."""
    rows = [["goodput", *(_f(r["goodput"], ".1%") for r in results)],
            ["steady-state goodput", *(_f(r["steady_goodput"], ".1%") for r in results)],
            ["steady-state goodput, training span", *(_f(r["steady_goodput_training"], ".1%") for r in results)],
            ["median step ms", *(_f(r["median_step_s"] * 1000) for r in results)],
            ["wall s", *(f"{r['wall_s']:.1f}" for r in results)],
            ["steps / attempts / exit", *(f"{r['steps']} / {r['attempts']} / {r['exit_code']}" for r in results)],
            ["events fired", *(str(r["fired"]) for r in results)]]
    names = {**LABELS, "exit": "launcher exit"}
    rows += [[f"{names[key]} s", *(f"{r['split'][f'{key}_s']:.1f}" for r in results)] for key in (*BUCKETS, "exit")]
    rows.append(["the events' cost s", *(f"{sum(e.get('cost_s') or 0.0 for e in r['events']):.1f}" for r in results)])
    return report.table(["", *(r["mode"] for r in results)], rows)


PACKAGES = ("torch", "ray")


def markdown(results: list[dict[str, Any]], command: str, info: dict[str, Any], load_end: list[float] | None,
             commit_end: str | None) -> str:
    """``info`` is :func:`trainkit.bench.report.machine` at the start; the commit at the end is
    named too, since Ray's workers import trainkit from the tree while the job runs."""
    raw = {r["mode"]: {k: v for k, v in r.items() if k not in ("run_dir", "launch_log")} for r in results}
    body = ([comparison(results)] if len(results) > 1 else []) + ["\n".join(summary_lines(r)) for r in results]
    return report.section(command, info, body, raw, packages=PACKAGES, wall_s=sum(r["wall_s"] for r in results),
                          load_end=load_end, commit_end=commit_end)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainkit.bench spot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated, run in this order on the same schedule (default restart,replicas)")
    parser.add_argument("--minutes", type=float, default=12.0, help="planned job length (default 12)")
    parser.add_argument("--drain-every", type=float, default=180.0, help="seconds between drains, ~ (0: none)")
    parser.add_argument("--kill-every", type=float, default=420.0, help="seconds between hard kills, ~ (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", default="", help='explicit events instead, e.g. "drain@60,kill@150"')
    parser.add_argument("--grace", type=float, default=30.0, help="drain deadline, seconds after the notice")
    parser.add_argument("--replace-after", type=float, default=30.0,
                        help="seconds after an event until the lost node's replacement joins (default 30)")
    parser.add_argument("--steps", type=int, default=0, help=f"trainer.max_steps (default: minutes x {STEPS_PER_S:g}/s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--spare", type=int, default=1,
                        help="idle nodes beyond one per worker, warm capacity a restart can use at once (default 1)")
    parser.add_argument("--markdown", type=Path, help="append a dated section with the figures to this file")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (key=value)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        parser.error(f"--modes: {', '.join(unknown) or 'none given'}; choose from {', '.join(MODES)}")
    duration = args.minutes * 60
    if args.schedule:
        schedule = parse_schedule(args.schedule)
    else:
        schedule = make_schedule(duration, drain_every_s=args.drain_every, kill_every_s=args.kill_every,
                                 seed=args.seed, workers=args.workers)
    steps = args.steps or max(1, round(duration * STEPS_PER_S))
    print(format_schedule(schedule), flush=True)
    info = report.machine(PACKAGES)
    results = []
    for mode in modes:
        print(f"[spot] mode {mode}: {steps} steps", flush=True)
        result = run_bench(schedule, steps=steps, workers=args.workers, spare=args.spare, grace_s=args.grace,
                           replace_after_s=args.replace_after, overrides=args.overrides, mode=mode,
                           timeout_s=duration * 4 + 600, log=lambda s: print(s, flush=True))
        print("\n".join(summary_lines(result)), flush=True)
        print(json.dumps(result, default=str), flush=True)
        results.append(result)
    load_end = report.load_avg()
    if len(results) > 1:
        print(comparison(results))
    if args.markdown:
        command = "python -m trainkit.bench spot " + " ".join(sys.argv[1:] if argv is None else argv)
        report.append(args.markdown, markdown(results, command.strip(), info, load_end, report.git_commit()),
                      "Spot schedule benchmarks")
    if any(r["exit_code"] != 0 or r["history_problems"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
