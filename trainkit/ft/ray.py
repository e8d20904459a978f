"""``ft.mode=replicas`` on Ray Train, through its ``TorchftConfig``: what ``launcher=ray``
runs, inside its Ray session, when the config says ``ft.mode=replicas`` (docs/fault-tolerance.md).

Ray starts the lighthouse (an actor on the controller's node), one worker per replica group,
and replaces only a failed group (``TorchftConfig``'s backend has replica groups); each worker
runs the same group loop as on ``launcher=local`` (:func:`trainkit.ft.loop.run_group`), with
its world rank as the group. What the local supervisor does at the end (the exactly-once
check, metrics and events, summary.json) runs here in the driver once ``fit()`` returns.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from trainkit import _compat
from trainkit.config import Config, run_dir_default
from trainkit.errors import TrainkitError
from trainkit.ft.ledger import read
from trainkit.ft.loop import BARRIER_ENV, INCARNATION_ENV, LIGHTHOUSE_ENV, LeftQuorum, run_group
from trainkit.ft.records import record_attempt, write_config
from trainkit.ft.supervisor import write_summary



class GroupLeft(TrainkitError):
    """Raised in a Ray worker whose group left the quorum: Ray replaces the failed group."""


def _group(config: dict[str, Any]) -> None:
    """One replica group, as a Ray Train worker."""
    import ray.train

    cfg = config["cfg"]
    group = ray.train.get_context().get_world_rank()
    # A replacement keeps its group's world rank; its incarnation is how many started before it.
    started = sum(1 for r in read(cfg["run_dir"], cfg["ft"]["groups"])[group] if r.get("event") == "start")
    os.environ.update({LIGHTHOUSE_ENV: os.environ[_compat.ray_torchft_lighthouse_env()], INCARNATION_ENV: str(started),
                       BARRIER_ENV: config["barrier"]})
    try:
        run_group(cfg, group)
    except LeftQuorum as exc:
        raise GroupLeft(str(exc)) from None


def run(cfg: Config, *, storage_path: str = "", env: dict[str, str] | None = None) -> tuple[int, str]:
    """Trains ``cfg`` with one Ray Train worker per replica group, inside an open Ray session;
    (exit code, what failed). ``env``: the workers' extra environment (the launcher's)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ft = cfg.ft
    if not cfg.run_dir:
        cfg.run_dir = run_dir_default(cfg.recipe)
    began = time.time()
    record_attempt(cfg, began=None, outcome=None)
    write_config(cfg)
    barrier = tempfile.mkdtemp(prefix="trainkit-ft-barrier-")  # one machine: the loopback slice
    # The lighthouse listens on this node's address (its actor runs on the controller's node).
    lighthouse = {"bind": f"{ray.util.get_node_ip_address()}:0", "min_replicas": ft.min_replicas,
                  "join_timeout_ms": int(ft.replacement_s * 1000),
                  "heartbeat_timeout_ms": int(ft.heartbeat_timeout_s * 1000)}
    trainer = TorchTrainer(
        train_loop_per_worker=_group, train_loop_config={"cfg": cfg.to_dict(), "barrier": barrier},
        scaling_config=ScalingConfig(num_workers=ft.groups, use_gpu=False),
        torch_config=_compat.ray_torchft_config()(lighthouse_kwargs=lighthouse, backend="gloo"),
        run_config=RunConfig(name=f"ft-{os.path.basename(cfg.run_dir.rstrip('/'))}-{int(began)}",
                             storage_path=storage_path or None,
                             failure_config=FailureConfig(max_failures=ft.max_restarts * ft.groups),
                             worker_runtime_env={"env_vars": dict(env or {})}))
    try:
        trainer.fit()
    except Exception as exc:  # Ray's TrainingFailedError wraps what the last failure was
        record_attempt(cfg, began=began, outcome=None)
        return 1, f"replicas on Ray failed: {' '.join(str(exc).split())[:2000]}"
    finally:
        shutil.rmtree(barrier, ignore_errors=True)
    record_attempt(cfg, began=began, outcome="finished")
    records = [r for rs in read(cfg.run_dir, ft.groups).values() for r in rs if float(r.get("time", 0)) >= began]
    starts = sum(1 for r in records if r.get("event") == "start")
    left = sum(1 for r in records if r.get("event") == "left")
    write_summary(cfg, began=began, lost=max(0, starts - ft.groups - left), left=left)
    return 0, ""
