"""Helpers for the Ray suite: the loopback multi-node cluster (shared with the benches) and a
background launcher."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from launching import ROOT
from trainkit.bench.loopback import LoopbackCluster

__all__ = ["LoopbackCluster", "start_launch", "wait_for"]


def start_launch(*overrides: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m trainkit.launch ...`` in the background, output to ``log``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.setdefault("TRAINKIT_STORE", str(ROOT / ".cache" / "test-store"))
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "tests"), full_env.get("PYTHONPATH", "")) if p
    )
    out = open(log, "w")  # noqa: SIM115 - closed by the OS when the child ends
    return subprocess.Popen([sys.executable, "-m", "trainkit.launch", *overrides],
                            stdout=out, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=ROOT)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"launcher exited ({proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{_tail(log)}")


def _tail(log: Path | None, n: int = 60) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
