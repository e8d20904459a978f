"""Launch real worker processes (gloo on 127.0.0.1, a free port each time) for checkpoint tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKERS = HERE / "ckpt_workers.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, world: int, port: int, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def start(fn: str, world: int, args: dict, *, env: dict | None = None, log_dir: Path | None = None):
    port = free_port()
    procs = []
    for rank in range(world):
        out = open(log_dir / f"{fn}-rank{rank}.log", "w") if log_dir else subprocess.DEVNULL  # noqa: SIM115
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKERS), fn, json.dumps(args)], env=worker_env(rank, world, port, env),
            stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO),
        ))
    return procs


def run(fn: str, world: int, args: dict, tmp_path: Path, *, timeout: float = 120, env: dict | None = None) -> list[int]:
    """Runs ``ckpt_workers.fn`` on ``world`` ranks; fails the test (with logs) on a non-zero exit."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir(exist_ok=True)
    procs = start(fn, world, args, env=env, log_dir=log_dir)
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(max(1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):
        logs = "\n".join(f"--- rank {r} ---\n" + (log_dir / f"{fn}-rank{r}.log").read_text()[-4000:] for r in range(world))
        raise AssertionError(f"{fn} exit codes {codes}\n{logs}")
    return codes
