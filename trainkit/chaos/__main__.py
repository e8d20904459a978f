"""``python -m trainkit.chaos [options] -- <launch overrides>``

Runs the recipe once without interruption (the reference), then again under a random
schedule of faults — SIGKILL of one worker or of the whole launch (a lost machine), some
timed to land while a checkpoint is being written, and SIGTERM with notice — relaunching
the same command after each until it finishes. Then it compares the two runs: per-step
losses in ``metrics.jsonl`` and the exported weights must be identical, and a SIGTERM must
lose no step. Exit code 0 when they agree. With ``ft.mode=replicas`` the faults take replica
groups instead (:mod:`trainkit.chaos.replicas`).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil

from trainkit import rundir, storage


@dataclass
class Fault:
    kind: str  # "kill-worker" | "kill-all" | "kill-mid-save" | "sigterm"
    at_step: int


@dataclass
class Attempt:
    fault: str
    exit_code: int
    last_logged_step: int
    # For kills: whether a checkpoint was being written at that instant.
    mid_save: bool = False


@dataclass
class Report:
    attempts: list[Attempt] = field(default_factory=list)
    identical_losses: bool = False
    identical_weights: bool = False
    steps_lost_on_sigterm: list[int] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.identical_losses and self.identical_weights and not any(self.steps_lost_on_sigterm)


def last_step(run_dir: str) -> int:
    """The newest step the run is known to have reached: its last metrics record, or a later
    checkpoint it took (records come every log_every steps, saves more often)."""
    logged = max((r["step"] for r in rundir.read_metrics(run_dir)), default=0)
    saved = max((e["step"] for e in rundir.of(rundir.read_events(run_dir), rundir.CHECKPOINT)), default=0)
    return max(logged, saved)


def saving_now(run_dir: str) -> bool:
    """A checkpoint directory without its manifest: a save is being written."""
    fs, path = storage.filesystem(rundir.path(run_dir, rundir.CHECKPOINTS))
    try:
        entries = [e for e in fs.ls(path, detail=False) if rundir.STEP_RE.match(os.path.basename(e.rstrip("/")))]
        return any(not fs.exists(f"{e.rstrip('/')}/{rundir.MANIFEST}") for e in entries)
    except FileNotFoundError:
        return False


def _is_worker(proc: psutil.Process) -> bool:
    """A training worker, not multiprocessing's resource tracker or another helper."""
    try:
        return "spawn_main" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def plan(kills: int, sigterms: int, max_steps: int, rng: random.Random, *, margin: int = 1) -> list[Fault]:
    """The faults at sorted random steps, ``margin`` steps or more before the end: a fault is
    delivered when the run is seen at its step, which it may only be a record or a save later."""
    kinds = ["kill-mid-save"] * max(1, kills // 3) + ["sigterm"] * sigterms
    kinds += [rng.choice(["kill-worker", "kill-all"]) for _ in range(kills - kinds.count("kill-mid-save"))]
    rng.shuffle(kinds)
    steps = sorted(rng.randint(2, max(2, max_steps - margin)) for _ in kinds)
    return [Fault(k, s) for k, s in zip(kinds, steps)]


class Harness:
    def __init__(self, overrides: list[str], workdir: str, env: dict[str, str] | None = None,
                 timeout: float = 900.0) -> None:
        self.overrides = overrides
        self.workdir = workdir
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.timeout = timeout

    def _start(self, run_dir: str) -> subprocess.Popen[bytes]:
        # The recipe's own log_every: a resumed run's records at the regular logging steps must
        # equal the reference's whatever the interval (the logging window is in the state tree).
        cmd = [sys.executable, "-m", "trainkit.launch", *self.overrides, f"run_dir={run_dir}",
               "trainer.progress=plain"]
        log = open(os.path.join(self.workdir, "launch.log"), "ab")
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def run_reference(self) -> str:
        run_dir = storage.join(self.workdir, "reference") if "://" in self.workdir else os.path.join(self.workdir, "reference")
        proc = self._start(run_dir)
        if proc.wait(self.timeout) != 0:
            raise RuntimeError(f"reference run failed with exit code {proc.returncode}; see {self.workdir}/launch.log")
        return run_dir

    def _deliver(self, proc: subprocess.Popen[bytes], fault: Fault, run_dir: str, rng: random.Random) -> bool:
        """Waits for the fault's step (and, for mid-save kills, for a save in flight), then strikes.

        Returns whether a checkpoint was being written when the kill landed.
        """
        deadline = time.monotonic() + self.timeout
        reached = None
        while proc.poll() is None and time.monotonic() < deadline:
            step = last_step(run_dir)
            if step >= fault.at_step:
                reached = reached or time.monotonic()
                if fault.kind != "kill-mid-save" or saving_now(run_dir):
                    break
                if time.monotonic() - reached > 30:
                    break  # no save seen in time: an ordinary kill then
            time.sleep(0.005 if reached else 0.02)
        if proc.poll() is not None:
            return False
        if fault.kind == "sigterm":
            proc.send_signal(signal.SIGTERM)
            return False
        mid_save = saving_now(run_dir)
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if _is_worker(c)]
        if fault.kind == "kill-worker" and workers:
            rng.choice(workers).kill()
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        return mid_save

    def run_chaos(self, faults: list[Fault], seed: int) -> tuple[str, list[Attempt]]:
        rng = random.Random(seed)
        run_dir = os.path.join(self.workdir, "chaos")
        attempts = []
        pending = list(faults)
        while True:
            before = last_step(run_dir)
            proc = self._start(run_dir)
            fault = pending.pop(0) if pending else None
            mid_save = False
            if fault is not None:
                fault.at_step = max(fault.at_step, before + 1)
                mid_save = self._deliver(proc, fault, run_dir, rng)
            code = proc.wait(self.timeout)
            attempts.append(Attempt(fault.kind if fault else "none", code, last_step(run_dir), mid_save))
            if code == 0:
                return run_dir, attempts
            if fault is None:
                raise RuntimeError(f"an undisturbed attempt failed with exit code {code}; see {self.workdir}/launch.log")


def compare(reference: str, chaos: str, attempts: list[Attempt]) -> Report:
    from trainkit.checkpoint.warm import read_safetensors_weights

    report = Report(attempts=attempts)
    ref = {r["step"]: r["loss"] for r in rundir.read_metrics(reference)}
    got = {r["step"]: r["loss"] for r in rundir.read_metrics(chaos)}
    events = rundir.read_events(chaos)
    # A preemption writes one record at its stop step, off the regular steps; nothing else may differ.
    stops = {e["step"] for e in rundir.of(events, rundir.PREEMPTED)}
    extra = set(got) - set(ref) - stops
    diff = sorted([s for s in ref if got.get(s) != ref[s]] + list(extra))
    report.identical_losses = not diff
    if diff:
        report.mismatches.append(f"losses differ at steps {diff[:10]}")
    # One model.safetensors, or Hugging Face shards + index (a sharded run exports from every rank).
    a, b = read_safetensors_weights(reference), read_safetensors_weights(chaos)
    report.identical_weights = a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    if not report.identical_weights:
        report.mismatches.append("exported weights differ")
    stop = None
    for event in events:
        if event.get("event") == rundir.PREEMPTED.name:
            stop = event["step"]
        elif event.get("event") == rundir.RESTORE.name and stop is not None:
            report.steps_lost_on_sigterm.append(stop - event["step"])
            stop = None
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, overrides = argv[:split], argv[split + 1 :]
    else:
        own, overrides = argv, []
    from trainkit.launch.compose import compose_config

    if compose_config(overrides).ft.mode == "replicas":
        from trainkit.chaos import replicas

        return replicas.main(own, overrides)
    p = argparse.ArgumentParser(prog="python -m trainkit.chaos")
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--sigterms", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/chaos")
    args = p.parse_args(own)
    cfg = compose_config(overrides)
    os.makedirs(args.workdir, exist_ok=True)
    harness = Harness(overrides, args.workdir)
    faults = plan(args.kills, args.sigterms, cfg.trainer.max_steps, random.Random(args.seed),
                  margin=2 * cfg.trainer.log_every)
    print(f"reference run ({cfg.trainer.max_steps} steps) ...", flush=True)
    reference = harness.run_reference()
    print(f"chaos run with {len(faults)} faults: {', '.join(f'{f.kind}@{f.at_step}' for f in faults)}", flush=True)
    chaos, attempts = harness.run_chaos(faults, args.seed)
    report = compare(reference, chaos, attempts)
    for a in report.attempts:
        where = " (mid-save)" if a.mid_save else ""
        print(f"  attempt: fault={a.fault + where:25s} exit={a.exit_code:4d} last logged step={a.last_logged_step}")
    print(f"identical losses: {report.identical_losses}  identical weights: {report.identical_weights}  "
          f"steps lost per SIGTERM: {report.steps_lost_on_sigterm}")
    for m in report.mismatches:
        print(f"  MISMATCH: {m}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
