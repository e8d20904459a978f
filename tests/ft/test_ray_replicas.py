"""ft.mode=replicas on a loopback Ray cluster, through launcher=ray and Ray Train's
TorchftConfig: one worker per replica group; a group's worker SIGKILLed, Ray replaces only that group, the replacement
heals from the live peer, and every position is trained once."""

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
