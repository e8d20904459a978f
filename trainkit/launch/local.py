"""``launcher=local``: N worker processes on this machine through torch's elastic agent.

The agent (the machinery behind ``torchrun``) spawns the workers, sets up rendezvous on
loopback, watches them, and tears the group down when one fails; we only translate its
outcome into one clear message and an exit code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainkit.config import Config, LauncherOptions
from trainkit.errors import EXIT_PREEMPTED, ConfigError
from trainkit.launch.base import JobResult, Launcher, attempt
from trainkit.options import positive


@dataclass
class LocalOptions(LauncherOptions):
    # The rendezvous port on loopback; 0 picks a free one.
    master_port: int = 0

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        positive("launcher.master_port", self.master_port, allow_zero=True)
        if self.master_port > 65535:
            raise ConfigError(f"launcher.master_port={self.master_port} must be <= 65535")


class LocalLauncher(Launcher):
    """``launcher=local``: the workers as child processes of this one."""

    Options = LocalOptions

    def run(self, cfg: Config) -> JobResult:
        if cfg.ft.mode == "replicas":
            from trainkit.ft.supervisor import ReplicaSupervisor

            forward_signals(cfg.preemption.signals)
            return attempt(lambda: ReplicaSupervisor(cfg).run())
        return attempt(lambda: launch(cfg))


def launch(cfg: Config) -> tuple[int, str]:
    """Runs the job: (exit code, what failed); a failed worker's traceback is printed here."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from trainkit.distributed import free_port
    from trainkit.launch.worker import worker_main

    # The agent logs each worker's traceback and every teardown step; we report once instead.
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    nodes = cfg.launcher.nodes
    if nodes > 1:
        # One launcher per node (e.g. one Slurm task each) meeting at a shared endpoint.
        endpoint = os.environ.get("TRAINKIT_RDZV_ENDPOINT") or (
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}" if "MASTER_ADDR" in os.environ else ""
        )
        run_id = os.environ.get("TRAINKIT_RDZV_ID", "")
        if not endpoint or not run_id:
            raise ConfigError(
                f"launcher.nodes={nodes} needs TRAINKIT_RDZV_ENDPOINT (host:port on the first node) and "
                "TRAINKIT_RDZV_ID (the same on every node); launchers/slurm.sbatch sets both"
            )
        # This node's address as its peers reach it; default: what the agent resolves.
        local_addr = os.environ.get("TRAINKIT_LOCAL_ADDR") or None
    else:
        endpoint = f"127.0.0.1:{cfg.launcher.master_port or free_port()}"
        run_id, local_addr = f"trainkit-{uuid.uuid4().hex[:8]}", "127.0.0.1"
    log_dir = tempfile.mkdtemp(prefix="trainkit-launch-")
    config = LaunchConfig(
        min_nodes=nodes,
        max_nodes=nodes,
        nproc_per_node=cfg.launcher.workers,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        rdzv_configs={"timeout": 120},
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        local_addr=local_addr,
        logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        # Our handlers forward stop signals to the workers (see forward_signals); the agent's
        # own would kill them before they can agree on a step and save.
        signals_to_handle="SIGHUP,SIGQUIT",
    )
    os.environ.setdefault("TORCHELASTIC_ERROR_FILE", os.path.join(log_dir, "error.json"))
    forward_signals(cfg.preemption.signals)
    try:
        elastic_launch(config, worker_main)(cfg.to_dict())
    except ChildFailedError as exc:
        return report_failure(exc, log_dir)
    return 0, ""


def forward_signals(names: list[str]) -> None:
    """Relays stop signals to the workers, which agree on a step, save and exit 75.

    On a spot VM, Kubernetes or Slurm the notice often reaches only the top process (us);
    on a terminal Ctrl-C reaches everyone, so a worker may see a signal twice, which the
    watcher tolerates. A second signal to us is relayed as well: the workers decide.
    """
    import psutil

    def relay(signum: int, frame: Any) -> None:
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.send_signal(signum)

    for name in names:
        signal.signal(getattr(signal, name), relay)


# Frames of the machinery between a worker's start and the job: the elastic agent's wrapper,
# the worker entry and, for script=, runpy.
_WRAPPER_FRAMES = ("torch/distributed/elastic", "trainkit/launch/", "<frozen runpy>")


def _user_frames(trace: str) -> str:
    """The traceback from the job's own first frame (the training function or the script)."""
    lines, out, skip = trace.rstrip().splitlines(), [], False
    for line in lines:
        if line.startswith("  File "):
            skip = any(w in line for w in _WRAPPER_FRAMES)
        elif not line.startswith("    "):
            skip = False
        if not skip:
            out.append(line)
    return "\n".join(out)


def _raised(log_dir: str) -> list[tuple[float, int, Any]]:
    """The error files the workers left (one per rank that raised), oldest first.

    The agent names only the first worker it saw exit, and that is as often a peer that just
    lost its connection to the rank that raised; the raiser's file says what happened.
    """
    found = []
    for path in Path(log_dir).glob("*/attempt_*/*/error.json"):
        with contextlib.suppress(OSError, ValueError):
            found.append((path.stat().st_mtime, int(path.parent.name), json.loads(path.read_text())))
    return sorted(found, key=lambda f: (f[0], f[1]))


def _describe(data: Any) -> tuple[str, str | None, int]:
    """(message, traceback or None, exit code) from an error file as ``@record`` or we write it."""
    msg = data.get("message") if isinstance(data, dict) else None
    if not isinstance(msg, dict):
        return str(msg or "<no message>"), None, 1
    extra = msg.get("extraInfo", {})
    return msg.get("message", "<no message>"), extra.get("py_callstack"), int(extra.get("exitcode", 1))


def report_failure(exc: Any, log_dir: str) -> tuple[int, str]:
    """The job's exit code and the failed worker's error in one line; prints its traceback.

    When every worker left with the preemption code the job is resumable: 75, no noise.
    """
    failures = exc.failures
    rank, first = min(failures.items(), key=lambda rf: rf[1].timestamp)
    # Workers that stopped for a preemption exit 75; the agent may then terminate stragglers.
    if first.exitcode == EXIT_PREEMPTED and all(f.exitcode in (EXIT_PREEMPTED, -15) for f in failures.values()):
        return EXIT_PREEMPTED, ""
    raised = _raised(log_dir)
    if raised:
        _, local_rank, data = raised[0]
        rank += local_rank - first.local_rank
        message, trace, code = _describe(data)
    else:  # nobody raised: killed by a signal, or exited on its own
        message, trace, code = first.message, None, first.exitcode
    if trace and not message.startswith("trainkit:"):
        print(_user_frames(trace), file=sys.stderr)
    return 1 if code in (0, None) or code < 0 else code, f"worker rank {rank} failed (exit code {code}): {message}"
