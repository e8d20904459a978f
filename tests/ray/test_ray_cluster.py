"""launcher=ray on a multi-node Ray cluster (several raylets on 127.0.0.1).

* a node removed mid-run: Ray restarts the worker group on a fresh node, the run resumes
  from trainkit's latest committed checkpoint and its per-step losses equal an
  uninterrupted run's, bit for bit (CPU, same world size);
* a worker SIGKILLed: the group restarts and recomputes at most one checkpoint interval
  (synchronous saves; with async ones, a save cut short in flight adds the steps since it);
* a two-trial sweep runs both trials on the cluster and prints a table;
* (slow) a Ray node drain reaches trainkit's preemption path: agreed stop, exit 75,
  Ray restarts the group elsewhere, the run resumes.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from ray_helpers import _tail, start_launch, wait_for
from launching import RESNET_TINY, launch, losses
from trainkit import rundir

EVERY = 10
TINY = [
    *RESNET_TINY, "strategy=ddp", "launcher.workers=2", "trainer.threads=1",
    f"checkpoint.every_steps={EVERY}", "trainer.max_steps=60",
]


def ray_args(cluster) -> list[str]:
    return ["launcher=ray", f"launcher.address={cluster.address}"]


def events(run_dir: Path) -> list[dict]:
    return rundir.read_events(str(run_dir))


def committed(run_dir: Path) -> bool:
    return bool(rundir.of(events(run_dir), rundir.CHECKPOINT_COMMITTED))


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> list[float]:
    """The same job, uninterrupted, with the local launcher (2 gloo processes)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = launch(*TINY, "launcher=local", f"run_dir={run_dir}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = losses(run_dir)
    assert len(out) == 60
    return out


def check_redone_work(ev: list[dict]) -> None:
    """Every restore resumes from the newest checkpoint committed before the failure. It redoes at
    most one interval, unless the failure cut short an async save still in flight: then it
    resumes from the save before that one (and also redoes the steps run since it was taken)."""
    for i, r in enumerate(ev):
        if r["event"] != rundir.RESTORE.name:
            continue
        taken = sorted({e["step"] for e in rundir.of(ev[:i], rundir.CHECKPOINT)})
        durable = [e["step"] for e in rundir.of(ev[:i], rundir.CHECKPOINT_COMMITTED)]
        assert taken and r["step"] >= max(durable, default=0), (r, taken, durable)
        if r["step"] < taken[-1]:
            assert taken[-1] not in durable and r["step"] == taken[-2], (r, taken, durable)
        else:
            assert 0 <= r["recomputed_steps"] <= EVERY, (r, taken)


def run_and_disturb(cluster, tmp_path: Path, disturb, *extra: str) -> tuple[int, Path, Path]:
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    proc = start_launch(*TINY, *ray_args(cluster), f"run_dir={run_dir}", *extra, log=log)
    try:
        wait_for(lambda: committed(run_dir), 240, "the first committed checkpoint", proc, log)
        disturb()
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, run_dir, log


@pytest.mark.rotate("ray-e2e")
def test_node_lost_mid_run_resumes_bitwise(ray_cluster, reference, tmp_path):
    ray_cluster.ensure(2)

    def lose_a_node() -> None:
        pids = wait_for(ray_cluster.worker_pids, 30, "train workers")
        victim = ray_cluster.node_of(pids[0])
        assert victim is not None
        ray_cluster.remove(victim, graceful=False)  # the machine is gone: no goodbye
        ray_cluster.add()  # the autoscaler's replacement

    rc, run_dir, log = run_and_disturb(ray_cluster, tmp_path, lose_a_node)
    assert rc == 0, _tail(log)
    ev = events(run_dir)
    restores = rundir.of(ev, rundir.RESTORE)
    assert restores, _tail(log)
    check_redone_work(ev)
    assert len(rundir.of(ev, rundir.START)) >= 2
    assert losses(run_dir) == reference  # bitwise: same world size, deterministic resume
    summary = rundir.read_summary(str(run_dir))
    assert summary["steps"] == 60 and summary["world_size"] == 2


@pytest.mark.slow  # ~35 s; a lost Ray node (test_node_lost_mid_run_resumes_bitwise) is the default proof of Ray restart + bitwise resume
def test_worker_sigkill_restarts_group_and_resumes(ray_cluster, reference, tmp_path):
    ray_cluster.ensure(2)

    def kill_a_worker() -> None:
        pids = wait_for(ray_cluster.worker_pids, 30, "train workers")
        os.kill(pids[-1], signal.SIGKILL)

    # Synchronous saves: each one is durable before the next step, so a kill at any moment
    # redoes at most one checkpoint interval (async saves are covered by the node-loss test).
    rc, run_dir, log = run_and_disturb(ray_cluster, tmp_path, kill_a_worker, "checkpoint.async_save=false")
    assert rc == 0, _tail(log)
    ev = events(run_dir)
    restores = rundir.of(ev, rundir.RESTORE)
    assert restores, _tail(log)
    assert all(0 <= e["recomputed_steps"] <= EVERY for e in restores), restores
    check_redone_work(ev)
    assert losses(run_dir) == reference


@pytest.mark.slow  # ~85 s; warm standby is experimental and opt-in, not what a default run uses
def test_restart_takes_warm_standby_processes(ray_cluster, tmp_path):
    """The restarted group runs in the idle pre-imported processes the warm pool kept (not
    in cold ones), and those processes end with the job."""
    ray_cluster.ensure(2)
    seen: dict[str, list[int]] = {}

    def kill_once_warm() -> None:
        old = wait_for(ray_cluster.worker_pids, 30, "train workers")
        seen["warm"] = wait_for(lambda: len(ray_cluster.warm_pids()) >= 2 and ray_cluster.warm_pids(), 120,
                                "a warm standby process per node")
        os.kill(old[-1], signal.SIGKILL)
        seen["new"] = wait_for(lambda: (p := ray_cluster.worker_pids()) and len(p) == 2 and not set(p) & set(old)
                               and p, 120, "the restarted group")
        # The pool replaces what the restart used.
        seen["refill"] = wait_for(lambda: [p for p in ray_cluster.warm_pids() if p not in seen["warm"]], 120,
                                  "new warm processes after the restart")

    rc, run_dir, log = run_and_disturb(ray_cluster, tmp_path, kill_once_warm, "trainer.max_steps=3000",
                                       "launcher.warm_standby=1", "launcher.warm_refill_s=1")
    assert rc == 0, _tail(log)
    assert set(seen["new"]) <= set(seen["warm"]), (seen, _tail(log))
    assert rundir.of(events(run_dir), rundir.RESTORE), _tail(log)
    wait_for(lambda: not any(psutil.pid_exists(p) for p in seen["refill"]), 30,
             "the job's idle warm processes to end with it")


@pytest.mark.slow  # ~25 s; the sweep itself runs by default on the local launcher (test_ray_units.py)
def test_sweep_two_trials_on_ray(ray_cluster, tmp_path):
    ray_cluster.ensure(2)  # both trials at once: 2 trials x 1 worker x 1 CPU
    base = tmp_path / "sweep"
    proc = launch("-m", *RESNET_TINY, "strategy=single", "launcher.workers=1", "trainer.threads=1",
                  "trainer.max_steps=6",
                  "optim.lr=0.01,0.05", *ray_args(ray_cluster), f"run_dir={base}", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    trials = sorted(p.name for p in base.iterdir() if p.name.startswith("trial-"))  # tune/ holds the experiment
    assert trials == ["trial-0-lr=0.01", "trial-1-lr=0.05"], trials
    for name in trials:
        summary = rundir.read_summary(str(base / name))
        assert summary["steps"] == 6
    assert "sweep results:" in out and "running 2 trial(s) at a time" in out
    table = out[out.index("sweep results:"):]
    assert "optim.lr=0.01" in table and "optim.lr=0.05" in table and table.count("done") == 2
    # Different learning rates, different runs.
    assert losses(base / trials[0]) != losses(base / trials[1])


@pytest.mark.slow
def test_ray_node_drain_reaches_preemption_path(ray_cluster, tmp_path):
    ray_cluster.ensure(2)
    drained = {}

    def drain_a_node() -> None:
        pids = wait_for(ray_cluster.worker_pids, 30, "train workers")
        node = ray_cluster.node_of(pids[0])
        ray_cluster.drain(node, 60, "spot reclaim (test)")
        drained["node"] = node
        ray_cluster.add()  # replacement capacity; the draining node takes no new work

    try:
        # Long enough that the drain (polled every 2 s) is seen before the job ends.
        rc, run_dir, log = run_and_disturb(ray_cluster, tmp_path, drain_a_node, "trainer.max_steps=600")
    finally:
        if "node" in drained:
            ray_cluster.remove(drained["node"], graceful=True)
    assert rc == 0, _tail(log)
    ev = events(run_dir)
    preempted = rundir.of(ev, rundir.PREEMPTED)
    assert preempted, _tail(log)
    # The drained node's rank stopped for the drain, its peers because it did (one agreed step).
    assert "ray node drain" in log.read_text() or "drain" in preempted[0]["reason"], _tail(log)
    assert rundir.of(ev, rundir.RESTORE)
