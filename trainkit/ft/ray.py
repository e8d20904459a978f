"""``ft.mode=replicas`` on Ray Train, through its ``TorchftConfig``: what ``launcher=ray``
runs, inside its Ray session, when the config says ``ft.mode=replicas`` (docs/fault-tolerance.md).

Ray starts the lighthouse (an actor on the controller's node), one worker per replica group,
and replaces only a failed group (``TorchftConfig``'s backend has replica groups); each worker
runs the same group loop as on ``launcher=local`` (:func:`trainkit.ft.loop.run_group`), with
its world rank as the group. What the local supervisor does at the end (the exactly-once
check, metrics and events, summary.json) runs here in the driver once ``fit()`` returns.

A drain of a group's node (a spot notice seen by the autoscaler, ``ray drain-node``) reaches
the group through :class:`DrainPoller`, which raises the group's preemption flag shortly before
the drain's deadline: the group leaves the quorum on notice, as after a SIGTERM on
``launcher=local``. Ray Train's own route,
``ray.train.get_preemption_info()``, is closed here: Ray 2.60 starts no preemption watcher
for replica groups (its controller skips it), so the call would always answer None, and it
is a barrier over every worker, which would hold a survivor while its peer is replaced.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from trainkit import _compat
from trainkit.config import Config, load_config, run_dir_default
from trainkit.errors import TrainkitError
from trainkit.ft.ledger import read
from trainkit.ft.loop import BARRIER_ENV, INCARNATION_ENV, LIGHTHOUSE_ENV, LeftQuorum, run_group
from trainkit.ft.records import record_attempt, write_config
from trainkit.ft.supervisor import write_summary

log = logging.getLogger("trainkit.ft.ray")


# A drained group leaves this long before the drain's deadline, on top of its leave's own
# ft.leave_after_s: one step to see the flag at a step boundary, and a loaded machine's slack.
DRAIN_MARGIN_S = 3.0


class DrainPoller(threading.Thread):
    """Asks Ray every ``every_s`` seconds whether this worker's node is being drained, and on a
    drain raises the preemption flag of the group's watcher (:func:`trainkit.preemption.request`):
    the training thread of a Ray worker is not the main thread, so no signal handler of the
    group's loop would see a SIGTERM. A drain seen before the loop's watcher has started is
    handed over once it has.

    The flag goes up ``lead_s`` before the drain's deadline (at once without one): Ray puts a
    replica group's replacement into the group's own placement-group bundle, which stays on the
    draining node until that node is gone, so a group leaving at the notice would only make its
    peers train short of it for longer. Until then it trains with them as before."""

    def __init__(self, node_id: str, every_s: float, lead_s: float) -> None:
        super().__init__(name="trainkit-ft-drain", daemon=True)
        self.node_id = node_id
        self.every_s = every_s
        self.lead_s = lead_s
        self.deadline_ms: int | None = None
        self.errors = 0
        self._done = threading.Event()

    def run(self) -> None:
        from trainkit.preemption.watcher import drain_reason, request

        while self.deadline_ms is None and not self._done.is_set():
            try:
                drains = _compat.ray_draining_nodes()
            except Exception as exc:  # noqa: BLE001 - a GCS hiccup must not end the group
                self.errors += 1
                if self.errors in (1, 10) or self.errors % 100 == 0:
                    log.warning("replica group: asking Ray for node drains failed (%d so far): %s", self.errors, exc)
                drains = {}
            if self.node_id in drains:
                self.deadline_ms = int(drains[self.node_id])
            else:
                self._done.wait(self.every_s)
        if self.deadline_ms:
            self._done.wait(max(0.0, self.deadline_ms / 1000 - self.lead_s - time.time()))
        while not self._done.is_set() and request(drain_reason([self.node_id], self.deadline_ms or None)) == 0:
            self._done.wait(0.05)

    def stop(self) -> None:
        self._done.set()


class GroupLeft(TrainkitError):
    """Raised in a Ray worker whose group left the quorum: Ray replaces the failed group."""


def _group(config: dict[str, Any]) -> None:
    """One replica group, as a Ray Train worker."""
    import ray
    import ray.train

    cfg = config["cfg"]
    group = ray.train.get_context().get_world_rank()
    # A replacement keeps its group's world rank; its incarnation is how many started before it.
    started = sum(1 for r in read(cfg["run_dir"], cfg["ft"]["groups"])[group] if r.get("event") == "start")
    os.environ.update({LIGHTHOUSE_ENV: os.environ[_compat.ray_torchft_lighthouse_env()], INCARNATION_ENV: str(started),
                       BARRIER_ENV: config["barrier"]})
    # torchft's Manager logs every step at INFO, which Ray's log monitor ships to the driver.
    logging.getLogger("torchft").setLevel(logging.WARNING)
    job = load_config(cfg)
    drains = DrainPoller(ray.get_runtime_context().get_node_id(), job.preemption.poll_seconds,
                         job.ft.leave_after_s + DRAIN_MARGIN_S)
    drains.start()
    try:
        run_group(cfg, group)
    except LeftQuorum as exc:
        raise GroupLeft(str(exc)) from None
    finally:
        drains.stop()


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
                             # torchft's Rust side logs every quorum at INFO (the local supervisor quiets it too)
                             worker_runtime_env={"env_vars": {"RUST_LOG": "warn", **(env or {})}}))
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
