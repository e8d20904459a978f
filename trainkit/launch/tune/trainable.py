"""The Tune trainable of a sweep trial: starts the trial's trainkit run, reports its steps, stops it.

A class trainable (``ray.tune.Trainable``) because a stopped trial must stop its run cleanly:
Tune calls :meth:`TrialRun.cleanup` when the scheduler ends a trial, and the run then saves
at an agreed step and leaves with 75, so its run_dir holds a committed checkpoint.

Each :meth:`TrialRun.step` returns the run's next logged step from its ``metrics.jsonl``
(the latest value of every key so far, with its ``step``), so the scheduler judges every
logged step. Steps a resumed run logs again (recomputed after its last checkpoint) are not sent
twice. trainkit's ``latest`` pointer is the only checkpoint: Tune keeps none
(``checkpoint_at_end=False``), and a trial Tune restarts (after a lost driver or node) starts
its run again on the same run_dir, which resumes from there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ray import tune

from trainkit import rundir, storage
from trainkit.errors import EXIT_PREEMPTED
from trainkit.launch.base import EXIT_CONFIG

# Keys of a trial's last result when its run had a bad config (the table shows them).
EXIT_KEY = "trainkit_exit"
MESSAGE_KEY = "trainkit_message"


def trial_overrides(fixed: list[str], config: dict[str, Any]) -> list[str]:
    """The trial's overrides: the sweep's fixed ones, then its sampled values."""
    from trainkit.launch.tune.space import render

    return [*fixed, *(f"{k}={render(v)}" for k, v in config.items())]


class TrialRun(tune.Trainable):
    """One trial: ``python -m trainkit.launch.tune.trial`` on this node, followed through its run_dir."""

    def setup(self, config: dict[str, Any], *, spec: dict[str, Any]) -> None:
        self.run_dir = storage.join(spec["base"], os.path.basename(self.logdir.rstrip("/")))
        self.poll_s = 0.2 if storage.is_local(self.run_dir) else 2.0
        self.stop_grace_s = spec["stop_grace_s"]
        self.metric = spec["metric"]
        self.last_step = spec["last_step"]
        self.latest: dict[str, Any] = {}
        self.sent_step = 0
        self.queue: list[dict[str, Any]] = []
        self.proc: subprocess.Popen | None = None
        summary = rundir.read_summary(self.run_dir)
        if summary is not None:
            # Finished before a lost driver could record it: report it, do not run it again.
            self.latest = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
            self.latest["step"] = summary.get("steps", 0)
            self.finished_already = True
            return
        self.finished_already = False
        trial_spec = {"overrides": trial_overrides(spec["fixed"], config), "config_dirs": spec["config_dirs"],
                      "run_dir": self.run_dir}
        path = os.path.join(self.logdir, "trainkit-trial.json")
        with open(path, "w") as f:
            json.dump(trial_spec, f)
        print(f"sweep: {os.path.basename(self.run_dir)} {' '.join(trial_spec['overrides'][len(spec['fixed']):])}",
              flush=True)
        # stderr to a file (read when the run ends): a pipe nobody reads would stall the run.
        self.stderr_path = os.path.join(self.logdir, "trainkit-trial.stderr")
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "trainkit.launch.tune.trial", path], stderr=err,
                                         env={**os.environ, **spec["env"]})

    def step(self) -> dict[str, Any]:
        if self.finished_already:
            return {**self.latest, "done": True}
        while True:
            if not self.queue:
                self._read()
            if self.queue:
                record = self.queue.pop(0)
                self.latest = {**self.latest, **record}
                self.sent_step = record["step"]
                return dict(self.latest)
            code = self.proc.poll()
            if code is not None:
                self._read()
                if not self.queue:
                    return self._ended(code)
            else:
                time.sleep(self.poll_s)

    def _read(self) -> None:
        fresh = [r for r in rundir.read_metrics(self.run_dir)
                 if isinstance(r.get("step"), int) and r["step"] > self.sent_step]
        seen: dict[int, dict[str, Any]] = {}
        for r in fresh:
            seen[r["step"]] = {k: v for k, v in r.items() if isinstance(v, (int, float, str))}
        self.queue = [seen[s] for s in sorted(seen)]

    def _ended(self, code: int) -> dict[str, Any]:
        with open(self.stderr_path, errors="replace") as f:
            err = f.read()
        lines = [ln for ln in err.splitlines() if ln.strip()]
        message = next((ln for ln in reversed(lines) if ln.startswith("error: ")), lines[-1] if lines else "")
        if code == 0:
            summary = rundir.read_summary(self.run_dir) or {}
            final = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and k != "steps"}
            return {**self.latest, **final, "done": True}
        if code == EXIT_CONFIG:
            # A bad value for this trial: retrying cannot help; the table shows the line.
            # The metric is NaN (Tune insists on it; searchers count NaN as a failed point).
            return {self.metric: math.nan, **self.latest, EXIT_KEY: code,
                    MESSAGE_KEY: message.removeprefix("error: "), "done": True}
        sys.stderr.write(err)
        reason = "preempted" if code == EXIT_PREEMPTED else f"exit {code}"
        raise RuntimeError(f"trainkit run {self.run_dir} ended {reason}: {message}")

    def cleanup(self) -> None:
        """Stops a run that is still going (the scheduler ended the trial): save, then exit 75."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if self.sent_step >= self.last_step:
            # Stopped at the scheduler's last step, which is the run's own end: let it finish.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.stop_grace_s)
            if proc.poll() is not None:
                return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            print(f"sweep: {self.run_dir} did not stop within {self.stop_grace_s:g}s; killed", flush=True)
            proc.kill()
            proc.wait()
