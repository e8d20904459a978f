"""``python -m trainkit.bench ft``: what ``ft.mode=replicas`` costs when a group goes, and per step.

One invocation runs the real launcher (``launcher=local``, gloo on loopback, the tiny resnet)
five times, each for ``--steps`` steps of the same global batch:

- ``kill-allreduce`` and ``kill-commit``: two groups, group 1 SIGKILLed (the chaos hook
  ``TRAINKIT_FT_KILL``) while group 0 waits in the all-reduce, or right after a commit;
- ``notice``: group 1 gets a real SIGTERM (a spot notice) and leaves the quorum;
- ``steady``: two groups, no fault;
- ``ddp``: the restart mode, ``strategy=ddp launcher.workers=2``, same model, batch and steps.

The ledgers (``ft/group-<g>.jsonl``) give every commit's time, the restart mode's metrics.jsonl
(``trainer.log_every=1``) every step's. The kill itself, and the replacement process's start,
are in no ledger, so this process watches the groups' pids in ``/proc`` every few milliseconds
(a killed group stays a zombie until the supervisor reaps it; a process's start time is
``/proc/<pid>/stat``'s, to the 10 ms clock tick).

While a replacement heals (kill runs) or a leaver leaves (notice run), every chunk is paced
(``PACE_ENV``): unpaced, the survivor would finish before the replacement arrives, or inside the
leaver's window. The pace lengthens those steps, not the timeout a kill costs. The steady and
ddp runs use the plain resnet task, unpaced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from trainkit.bench import report
from trainkit.tasks.resnet import TASK as RESNET

ROOT = Path(__file__).resolve().parents[2]
PACE_ENV = "TRAINKIT_BENCH_FT_PACE_S"
LEDGERS_ENV = "TRAINKIT_BENCH_FT_LEDGERS"

BASE = [
    "recipe=resnet", "model.width=8", "model.blocks=[1,1]", "model.image_size=8",
    "optim.lr=0.1", "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0",
    "trainer.progress=off", "trainer.log_every=1", "checkpoint.enabled=false",
]
REPLICAS = ["strategy=ddp", "ft.mode=replicas", "ft.groups=2", "ft.heartbeat_timeout_s=1"]
WARMUP = 5  # first steps left out of the steady state (first quorum, allocator, caches)


def _paced_loss(model: Any, batch: Any) -> Any:
    """The resnet loss, slowed by ``PACE_ENV`` (``seconds:from:until``) per chunk once a ledger
    has a ``from`` event (always when empty) and until one has an ``until`` event."""
    pace, start, until = os.environ.get(PACE_ENV, "0::").split(":")
    if float(pace):
        text = "".join(_read(p) for p in Path(os.environ[LEDGERS_ENV]).glob("*.jsonl"))
        if (not start or f'"event": "{start}"' in text) and f'"event": "{until}"' not in text:
            time.sleep(float(pace))
    return RESNET.loss(model, batch)


PACED = dataclasses.replace(RESNET, loss=_paced_loss)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class _PidWatch(threading.Thread):
    """Each group process's start and death time (epoch seconds), seen from ``/proc``."""

    def __init__(self, ledgers: Path, poll_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.ledgers, self.poll_s = ledgers, poll_s
        self.started: dict[int, float] = {}
        self.died: dict[int, float] = {}
        self.done = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        # /proc's start times count clock ticks since boot: the boot clock, moved to epoch here
        # (/proc/stat's btime is whole seconds and drifts from the wall clock).
        self._boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)

    def _stat(self, pid: int) -> list[str] | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None

    def run(self) -> None:
        offsets: dict[Path, int] = {}  # bytes of each ledger read so far: a loop stays short
        while not self.done.is_set():
            for path in self.ledgers.glob("*.jsonl"):
                with open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    new = f.read()
                complete = new[:new.rfind(b"\n") + 1]
                offsets[path] = offsets.get(path, 0) + len(complete)
                for line in complete.decode().splitlines():
                    if '"event": "start"' in line:
                        pid = json.loads(line)["pid"]
                        fields = self._stat(pid)
                        self.started[pid] = (self._boot + int(fields[19]) / self._tick) if fields else float("nan")
            now = time.time()
            for pid in self.started:
                if pid not in self.died:
                    fields = self._stat(pid)
                    if fields is None or fields[0] in ("Z", "X"):
                        self.died[pid] = now
            time.sleep(self.poll_s)


def _launch(run_dir: Path, overrides: list[str], env: dict[str, str], timeout: float) -> tuple[float, _PidWatch]:
    ledgers = run_dir / "ft"
    ledgers.mkdir(parents=True, exist_ok=True)
    watch = _PidWatch(ledgers)
    watch.start()
    t0 = time.time()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", LEDGERS_ENV: str(ledgers), **env}
    try:
        out = subprocess.run([sys.executable, "-m", "trainkit.launch", *overrides, f"run_dir={run_dir}"],
                             capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    finally:
        watch.done.set()
        watch.join()
    if out.returncode != 0:
        raise SystemExit(f"bench ft: {run_dir.name} failed (exit {out.returncode}):\n{out.stdout[-2000:]}"
                         f"\n{out.stderr[-2000:]}")
    return time.time() - t0, watch


def _ledgers(run_dir: Path) -> dict[int, list[dict[str, Any]]]:
    from trainkit.ft import ledger

    return ledger.read(str(run_dir), 2)


def _commits(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "loss" in r]


def kill_figures(run_dir: Path, watch: _PidWatch) -> dict[str, Any]:
    """Kill → survivor's next commit; the replacement's start → its first commit, split."""
    led = _ledgers(run_dir)
    starts = [r for r in led[1] if r.get("event") == "start"]
    first, repl = starts[0], (starts[1] if len(starts) > 1 else None)
    kill_t = watch.died.get(first["pid"])
    if kill_t is None:
        raise SystemExit(f"bench ft: {run_dir.name}: group 1's first process was not seen dying")
    nxt = next(r for r in _commits(led[0]) if r["time"] > kill_t)
    out: dict[str, Any] = {
        "kill_to_survivor_commit_s": nxt["time"] - kill_t, "survivor_step": nxt["step"],
        "survivor_participants": nxt["participants"], "survivor_quorum_s": nxt["quorum_s"],
        "redone": sum(1 for r in led[0] if r.get("redo")),
    }
    if repl is None:
        return out
    healed = next((r for r in led[1] if r.get("event") == "healed" and r["time"] >= repl["time"]), None)
    mine = [r for r in _commits(led[1]) if r["time"] >= repl["time"]]
    proc_t = watch.started.get(repl["pid"], float("nan"))
    out.update(kill_to_replacement_process_s=proc_t - kill_t,
               replacement_start_to_commit_s=mine[0]["time"] - proc_t if mine else None,
               replacement_python_startup_s=repl["time"] - proc_t,
               replacement_manager_quorum_heal_s=healed["time"] - repl["time"] if healed else None,
               replacement_first_step_s=mine[0]["time"] - healed["time"] if healed and mine else None,
               healed_at_step=healed["step"] if healed else None,
               steps_alone=sum(1 for r in _commits(led[0]) if r["participants"] == 1))
    return out


def notice_figures(run_dir: Path) -> dict[str, Any]:
    """Notice → the survivor's first commit without the leaver, and its longest step meanwhile."""
    led = _ledgers(run_dir)
    leaving = next(r for r in led[1] if r.get("event") == "leaving")
    left = next(r for r in led[1] if r.get("event") == "left")
    commits = _commits(led[0])
    alone = next(r for r in commits if r["time"] > leaving["time"] and r["participants"] == 1)
    after = next(i for i, r in enumerate(commits) if r["time"] > leaving["time"])
    between = [r["time"] for r in commits[max(0, after - 1):] if r["time"] <= alone["time"]]
    gaps = [b - a for a, b in zip(between, between[1:])]
    return {"notice_to_survivor_alone_commit_s": alone["time"] - leaving["time"],
            "left_to_survivor_alone_commit_s": alone["time"] - left["time"], "leaver_silent_s": left["silent_s"],
            "window_steps": sum(1 for r in commits if r.get("window")),
            "survivor_longest_step_in_leave_s": max(gaps) if gaps else None,
            "redone": sum(1 for r in led[0] if r.get("redo"))}


def steady_replicas(run_dir: Path, steps: int) -> dict[str, Any]:
    """Group 0's commit-to-commit intervals of consecutive steps with both groups."""
    commits = [r for r in _commits(_ledgers(run_dir)[0]) if r["participants"] == 2
               and WARMUP <= r["step"] < steps and not r.get("window")]
    iv = [b["time"] - a["time"] for a, b in zip(commits, commits[1:]) if b["step"] == a["step"] + 1]
    return {"steps": len(iv), "median_step_s": statistics.median(iv),
            "median_quorum_s": statistics.median(r["quorum_s"] for r in commits)}


def steady_ddp(run_dir: Path, steps: int) -> dict[str, Any]:
    from trainkit import rundir

    metrics = [m for m in rundir.read_metrics(str(run_dir)) if WARMUP <= m["step"] <= steps]
    iv = [b["time"] - a["time"] for a, b in zip(metrics, metrics[1:])]
    return {"steps": len(iv), "median_step_s": statistics.median(iv),
            "median_step_time_s_metric": statistics.median(m["step_time_s"] for m in metrics)}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m trainkit.bench ft", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="trainer.max_steps of every run")
    ap.add_argument("--batch", type=int, default=16, help="the global data.batch_size")
    ap.add_argument("--kill-step", type=int, default=10, help="the step group 1 is killed at")
    ap.add_argument("--notice-step", type=int, default=120, help="the step group 1 gets its notice at")
    ap.add_argument("--pace", type=float, default=0.05, help="seconds per chunk while a replacement heals or a leaver leaves")
    ap.add_argument("--timeout", type=float, default=300, help="seconds each launch may take")
    ap.add_argument("--out", help="append the results to this markdown file")
    args = ap.parse_args(argv)
    if not args.kill_step < args.steps or not WARMUP + 2 < args.notice_step < args.steps:
        ap.error("--kill-step and --notice-step must fall inside --steps, after the warm-up")
    command = "python -m trainkit.bench ft " + " ".join(argv if argv is not None else sys.argv[2:])
    info = report.machine(("torch", "torchft"))
    t_start = time.time()
    common = [*BASE, f"data.batch_size={args.batch}", f"trainer.max_steps={args.steps}"]
    raw: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="trainkit-bench-ft-") as tmp:
        for point in ("allreduce", "commit"):
            run_dir = Path(tmp, f"kill-{point}")
            wall, watch = _launch(run_dir, [*common, *REPLICAS, "task=trainkit.bench.ft:PACED"],
                                  {"TRAINKIT_FT_KILL": f"1:{args.kill_step}:{point}", PACE_ENV: f"{args.pace}::healed"},
                                  args.timeout)
            raw[f"kill_{point}"] = {**kill_figures(run_dir, watch), "wall_s": wall}
        run_dir = Path(tmp, "notice")
        wall, _ = _launch(run_dir, [*common, *REPLICAS, "task=trainkit.bench.ft:PACED"],
                          {"TRAINKIT_FT_KILL": f"1:{args.notice_step}:notice", PACE_ENV: f"{args.pace}:leaving:left"},
                          args.timeout)
        raw["notice"] = {**notice_figures(run_dir), "wall_s": wall}
        run_dir = Path(tmp, "steady")
        wall, _ = _launch(run_dir, [*common, *REPLICAS], {}, args.timeout)
        raw["steady_replicas"] = {**steady_replicas(run_dir, args.steps), "wall_s": wall}
        run_dir = Path(tmp, "ddp")
        wall, _ = _launch(run_dir, [*common, "strategy=ddp", "launcher.workers=2"], {}, args.timeout)
        raw["steady_ddp"] = {**steady_ddp(run_dir, args.steps), "wall_s": wall}
    raw["overhead_ratio"] = raw["steady_replicas"]["median_step_s"] / raw["steady_ddp"]["median_step_s"]
    wall_s = time.time() - t_start

    def f(x: Any) -> str | None:
        return None if x is None else f"{x:.3f}"

    ka, kc = raw["kill_allreduce"], raw["kill_commit"]
    rows = [
        ["kill → survivor's next commit (s)", f(ka["kill_to_survivor_commit_s"]), f(kc["kill_to_survivor_commit_s"])],
        ["survivor's quorum wait in that step (s)", f(ka["survivor_quorum_s"]), f(kc["survivor_quorum_s"])],
        ["steps redone by the survivor", ka["redone"], kc["redone"]],
        ["kill → replacement process start (s)", f(ka.get("kill_to_replacement_process_s")),
         f(kc.get("kill_to_replacement_process_s"))],
        ["replacement start → its first commit (s)", f(ka.get("replacement_start_to_commit_s")),
         f(kc.get("replacement_start_to_commit_s"))],
        ["… Python, imports, model, data (s)", f(ka.get("replacement_python_startup_s")),
         f(kc.get("replacement_python_startup_s"))],
        ["… Manager, first quorum, heal from peer (s)", f(ka.get("replacement_manager_quorum_heal_s")),
         f(kc.get("replacement_manager_quorum_heal_s"))],
        ["… first step (s)", f(ka.get("replacement_first_step_s")), f(kc.get("replacement_first_step_s"))],
    ]
    n, sr, sd = raw["notice"], raw["steady_replicas"], raw["steady_ddp"]
    body = [
        "Kills (group 1 SIGKILLed at step %d; heartbeat timeout 1 s):" % args.kill_step,
        report.table(["figure", "mid-all-reduce", "between steps"], rows),
        "Notice-backed leave (group 1 SIGTERMed at step %d):" % args.notice_step,
        report.table(["figure", "value"], [
            ["notice → survivor's first commit without it (s)", f(n["notice_to_survivor_alone_commit_s"])],
            ["leaver's `left` → that commit (s)", f(n["left_to_survivor_alone_commit_s"])],
            ["survivor's longest step meanwhile (s)", f(n["survivor_longest_step_in_leave_s"])],
            ["window steps (trained without quorum)", n["window_steps"]],
            ["steps redone", n["redone"]]]),
        "Steady state, no fault, median commit-to-commit interval, steps %d..%d:" % (WARMUP, args.steps - 1),
        report.table(["mode", "steps", "median step (s)", "ratio"], [
            ["replicas (2 groups)", sr["steps"], f(sr["median_step_s"]), f(raw["overhead_ratio"])],
            ["restart mode, ddp, 2 workers", sd["steps"], f(sd["median_step_s"]), "1.000"]]),
    ]
    print("\n\n".join(body))
    if args.out:
        text = report.section(command, info, body, raw, packages=("torch", "torchft"), wall_s=wall_s,
                              load_end=report.load_avg(), commit_end=report.git_commit())
        report.append(args.out, text, "ft.mode=replicas: a lost group, a replacement, and per step")
    return raw


if __name__ == "__main__":
    run()
