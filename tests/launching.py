"""Running the real launcher in a subprocess, as a user would, and reading what it left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainkit import rundir

ROOT = Path(__file__).resolve().parent.parent

RESNET_TINY = [
    "recipe=resnet", "model.width=8", "model.blocks=[1,1]", "model.image_size=8",
    "data.batch_size=32", "optim.lr=0.1", "optim.schedule=constant", "optim.warmup_steps=0",
    "optim.weight_decay=0",
    "trainer.log_every=1", "trainer.progress=plain",
]
GPT_TINY = [
    "recipe=gpt", "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.seq_len=32",
    "model.corpus_bytes=200000", "data.batch_size=16", "optim.lr=3e-3", "optim.warmup_steps=0",
    "trainer.log_every=1", "trainer.progress=plain", "trainer.grad_clip=1.0",
]


def launch(*overrides: str, env: dict[str, str] | None = None, timeout: float = 300,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # One embedded store for the whole suite: each data set is prepared once.
    full_env.setdefault("TRAINKIT_STORE", str(ROOT / ".cache" / "test-store"))
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "tests"), full_env.get("PYTHONPATH", "")) if p
    )
    return subprocess.run(
        [sys.executable, "-m", "trainkit.launch", *overrides],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT,
    )


def launch_and_sigterm(*overrides: str, run_dir: str | Path, after_records: int,
                       timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Launches like :func:`launch` and sends SIGTERM (a spot notice) as soon as ``run_dir``
    holds ``after_records`` metrics records; stdout and stderr together in ``stdout``."""
    import signal
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TRAINKIT_STORE", str(ROOT / ".cache" / "test-store"))
    proc = subprocess.Popen([sys.executable, "-m", "trainkit.launch", *overrides], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(metrics(run_dir)) < after_records:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    return rundir.read_metrics(str(run_dir))


def losses(run_dir: str | Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


def launch_here(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in this process, for commands that start no worker (``--cfg``, ``--help``, bad
    input): the same code path as :func:`launch` without paying an interpreter start each."""
    import contextlib
    import io

    from trainkit.launch.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["trainkit.launch", *args], code, out.getvalue(), err.getvalue())
