"""ft.mode=replicas on a loopback Ray cluster, through launcher=ray and Ray Train's
TorchftConfig: one worker per replica group. A group's worker SIGKILLed: Ray replaces only that group, the replacement
heals from the live peer, and every position is trained once. A drain of a group's node: the group leaves the quorum
on notice, its peer loses no step. Every group lost, at once or one after the other: the replacements restore the
latest committed checkpoint, not step 0."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from trainkit import rundir
from trainkit.ft import ledger

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STORE = str(ROOT / ".cache" / "test-store")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_group_killed_on_ray_is_replaced_alone_and_heals_from_its_peer(ray_cluster, tmp_path, monkeypatch):
    import ray

    from trainkit.config import load_config
    from trainkit.ft.loop import reference_losses
    from trainkit.launch.compose import compose_config
    from trainkit.launch.ray.launcher import RayLauncher

    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("TRAINKIT_STORE", STORE)
    ray_cluster.ensure(2)
    steps = 400
    overrides = [
        "recipe=resnet", "task=ft_paced:TASK", "model.width=8", "model.blocks=[1,1]", "model.image_size=8",
        "data.batch_size=16", "optim.lr=0.05", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.weight_decay=0", f"trainer.max_steps={steps}", "strategy=ddp", "launcher=ray", "launcher.workers=1", "ft.mode=replicas", "ft.groups=2",
        "ft.heartbeat_timeout_s=1", "checkpoint.every_steps=50", f"run_dir={tmp_path / 'run'}",
    ]
    cfg = load_config(compose_config(overrides).to_dict())
    env = {"TRAINKIT_STORE": STORE, "PYTHONPATH": str(HERE), "GLOO_SOCKET_IFNAME": "lo", "RUST_LOG": "warn",
           "FT_TEST_CHUNK_S": "0.03"}
    ray.init(address=ray_cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    victim: list[int] = []

    def kill_group_1() -> None:
        path = tmp_path / "run" / rundir.ft_ledger(1)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            text = path.read_text() if path.exists() else ""
            if '"step": 20,' in text:
                pid = next(r["pid"] for r in ledger.read(str(tmp_path / "run"), 2)[1] if r.get("event") == "start")
                os.kill(pid, signal.SIGKILL)
                victim.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_group_1, daemon=True)
    killer.start()
    try:
        result = RayLauncher().run(cfg)
    finally:
        ray.shutdown()
    killer.join(1)
    assert result.exit_code == 0, result.message
    assert victim
    acc = ledger.account(str(tmp_path / "run"), groups=2, steps=steps, batch=16)
    assert [h["source"] for h in acc.healed[1]] == ["peer"], acc.healed
    records = ledger.read(str(tmp_path / "run"), 2)
    assert sum(1 for r in records[0] if r.get("event") == "start") == 1  # group 0 was never replaced
    assert 1 in acc.participants and acc.participants[-1] == 2
    assert acc.losses == reference_losses(cfg.to_dict())
    summary = rundir.read_summary(str(tmp_path / "run"))
    assert summary is not None and summary["ft"]["groups_lost"] == 1 and summary["ft"]["exactly_once"]


BASE = [
    "recipe=resnet", "task=ft_paced:TASK", "model.width=8", "model.blocks=[1,1]", "model.image_size=8",
    "data.batch_size=16", "optim.lr=0.05", "optim.schedule=constant", "optim.warmup_steps=0",
    "optim.weight_decay=0", "strategy=ddp", "launcher=ray", "launcher.workers=1", "ft.mode=replicas", "ft.groups=2",
    "ft.heartbeat_timeout_s=1",
]


def _on_ray(ray_cluster, tmp_path, monkeypatch, overrides, env_extra, action=None):
    """Runs the job through RayLauncher.run with ``action`` in a thread; (result, cfg)."""
    import ray

    from trainkit.config import load_config
    from trainkit.launch.compose import compose_config
    from trainkit.launch.ray.launcher import RayLauncher

    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("TRAINKIT_STORE", STORE)
    cfg = load_config(compose_config([*BASE, *overrides, f"run_dir={tmp_path / 'run'}"]).to_dict())
    env = {"TRAINKIT_STORE": STORE, "PYTHONPATH": str(HERE), "GLOO_SOCKET_IFNAME": "lo", "RUST_LOG": "warn",
           "FT_TEST_CHUNK_S": "0.03", **env_extra}
    ray.init(address=ray_cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    thread = threading.Thread(target=action, daemon=True) if action else None
    if thread:
        thread.start()
    try:
        result = RayLauncher().run(cfg)
    finally:
        ray.shutdown()
    if thread:
        thread.join(1)
    return result, cfg


def _group_pid_at(run_dir: Path, group: int, step: int, timeout_s: float = 600) -> int | None:
    """The pid of ``group``'s first incarnation once it has committed ``step`` (None: never)."""
    path = run_dir / rundir.ft_ledger(group)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if f'"step": {step},' in (path.read_text() if path.exists() else ""):
            return next(r["pid"] for r in ledger.read(str(run_dir), 2)[group] if r.get("event") == "start")
        time.sleep(0.05)
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_drained_node_on_ray_is_its_groups_notice_backed_leave(ray_cluster, tmp_path, monkeypatch):
    """Ray drains group 1's node at step ~20 (a spot notice, deadline 6 s later; the node is
    removed then, as the cloud reclaims it): the group sees the drain within
    preemption.poll_seconds (trainkit.ft.ray.DrainPoller), trains on until shortly before the
    deadline, then keeps training its share with its peer without quorums until its heartbeat
    has expired, and leaves; its peer redoes no step and its next quorum forms without it. Ray
    replaces group 1 on another node once the drained one is gone, and the replacement heals
    from the survivor."""
    from ft_paced import LEDGERS_ENV

    from trainkit.ft.loop import reference_losses

    ray_cluster.ensure(3)
    run_dir, steps, deadline_s = tmp_path / "run", 600, 6.0
    drained, reclaimed = [], []

    def drain_group_1() -> None:
        pid = _group_pid_at(run_dir, 1, 20)
        node = ray_cluster.node_of(pid) if pid else None
        if node is not None:
            ray_cluster.drain(node, deadline_s)
            drained.append(node)
            time.sleep(deadline_s)
            ray_cluster.remove(node)
            reclaimed.append(node)

    try:
        result, cfg = _on_ray(ray_cluster, tmp_path, monkeypatch,
                              [f"trainer.max_steps={steps}", "checkpoint.every_steps=100", "preemption.poll_seconds=0.2"],
                              {LEDGERS_ENV: str(run_dir / rundir.FT_LEDGERS)}, drain_group_1)
    finally:
        for node in drained:
            if node not in reclaimed:
                ray_cluster.remove(node)
    assert result.exit_code == 0, result.message
    assert drained
    records = ledger.read(str(run_dir), 2)
    leaving = [r for r in records[1] if r.get("event") == "leaving"]
    left = [r for r in records[1] if r.get("event") == "left"]
    assert len(leaving) == 1 == len(left) and leaving[0]["reason"].startswith("ray node drain"), records[1][-5:]
    s, k = leaving[0]["step"], left[0]["step"]
    assert left[0]["silent_s"] >= 1.0  # the lighthouse had dropped it before its peer's next quorum
    acc = ledger.account(str(run_dir), groups=2, steps=steps, batch=16)
    assert acc.redone == 0, acc  # no step tried twice: the leave cost the survivor no step
    window = [r["step"] for r in records[0] if r.get("window")]
    assert window == list(range(s + 1, k)) and window, (s, k, window)
    assert acc.participants[:k] == [2] * k and acc.participants[k] == 1, acc.participants
    assert sum(1 for r in records[0] if r.get("event") == "start") == 1  # group 0 was never replaced
    assert [h["source"] for h in acc.healed[1]] == ["peer"], acc.healed
    assert acc.losses == reference_losses(cfg.to_dict())
    summary = rundir.read_summary(str(run_dir))
    assert summary is not None and summary["ft"]["groups_left"] == 1 and summary["ft"]["groups_lost"] == 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_group_killed_on_ray_resumes_from_the_committed_checkpoint(ray_cluster, tmp_path, monkeypatch):
    """Both groups SIGKILLed after committing step 24 (checkpoint at 20): Ray starts the groups
    again, which find no live peer and restore step 20, not step 0, and redo 20..24 with the
    same positions."""
    from trainkit.ft.loop import KILL_ENV, reference_losses

    ray_cluster.ensure(2)
    run_dir, steps = tmp_path / "run", 60
    result, cfg = _on_ray(ray_cluster, tmp_path, monkeypatch, [f"trainer.max_steps={steps}", "checkpoint.every_steps=20"],
                          {KILL_ENV: "0:24:commit,1:24:commit"})
    assert result.exit_code == 0, result.message
    acc = ledger.account(str(run_dir), groups=2, steps=steps, batch=16)
    heals = [h for g in (0, 1) for h in acc.healed.get(g, [])]
    # The first group to reach a quorum restores step 20; one that comes later heals from it.
    assert {h["step"] for h in heals if h["source"] == "checkpoint"} == {20}, heals
    assert all(h["step"] >= 20 for h in heals) and len(heals) == 2
    assert acc.recomputed == [20, 21, 22, 23, 24]
    assert acc.losses == reference_losses(cfg.to_dict())
    summary = rundir.read_summary(str(run_dir))
    assert summary is not None and summary["ft"]["groups_lost"] == 2 and summary["ft"]["exactly_once"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_replacement_on_ray_with_no_live_peer_restores_the_latest_checkpoint(ray_cluster, tmp_path, monkeypatch):
    """Group 1 SIGKILLed after step 24; group 0 trains on alone, checkpoints step 40 and is
    SIGKILLed after committing step 40, seconds before group 1's replacement can have started. The
    replacement finds nobody to heal from and restores step 40 (the survivor's checkpoint: not
    step 0, not its own last step), redoing step 40 with the same positions."""
    from trainkit.ft.loop import KILL_ENV, reference_losses

    ray_cluster.ensure(2)
    run_dir, steps = tmp_path / "run", 70
    result, cfg = _on_ray(ray_cluster, tmp_path, monkeypatch, [f"trainer.max_steps={steps}", "checkpoint.every_steps=20"],
                          {KILL_ENV: "1:24:commit,0:40:commit"})
    assert result.exit_code == 0, result.message
    acc = ledger.account(str(run_dir), groups=2, steps=steps, batch=16)
    assert acc.healed[1][0]["source"] == "checkpoint" and acc.healed[1][0]["step"] == 40, acc.healed
    assert all(h["step"] >= 40 for g in (0, 1) for h in acc.healed.get(g, []))
    assert acc.participants[25:40] == [1] * 15, acc.participants  # group 0 alone after the first loss
    assert acc.recomputed == [40]
    assert acc.losses == reference_losses(cfg.to_dict())
