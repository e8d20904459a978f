"""A Ray user's own ``TorchTrainer.fit()`` on trainkit's training function (the public entry
point in docs/clusters.md), on the loopback multi-raylet cluster: the ``Result`` carries
trainkit's logged metrics and its last committed checkpoint, as a pointer Ray did not copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from launching import RESNET_TINY, ROOT
from trainkit import rundir

STEPS, EVERY, LOG_EVERY = 20, 10, 5


@pytest.mark.rotate("ray-e2e")
def test_torch_trainer_fit_gives_a_result_with_metrics_and_a_checkpoint(ray_cluster, tmp_path, monkeypatch):
    ray_cluster.ensure(2)
    monkeypatch.setenv("TRAINKIT_STORE", str(ROOT / ".cache" / "test-store"))
    from trainkit.launch.ray.session import ray_env

    ray_env()  # Ray Train v2, before ray.train is imported
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainkit.launch.compose import compose_config
    from trainkit.launch.prepare import prepare
    from trainkit.launch.ray import train_loop_per_worker, worker_cfg
    from trainkit.launch.ray.report import POINTER_FILE, POINTER_FORMAT

    run_dir, storage = tmp_path / "run", tmp_path / "ray-results"
    cfg = compose_config([*RESNET_TINY, "strategy=ddp", "launcher=ray", "launcher.workers=2", "trainer.threads=1",
                          f"trainer.max_steps={STEPS}", f"checkpoint.every_steps={EVERY}",
                          f"trainer.log_every={LOG_EVERY}", f"run_dir={run_dir}"])
    prepare(cfg)
    ray.init(address=ray_cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        result = TorchTrainer(
            train_loop_per_worker, train_loop_config=worker_cfg(cfg),
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="users-own", storage_path=str(storage)),
        ).fit()
    finally:
        ray.shutdown()
    assert result.error is None
    assert result.return_value["exit_code"] == 0 and result.return_value["summary"]["steps"] == STEPS
    # Metrics: trainkit's last logged record (rank 0's), plus the summary's figures.
    last = rundir.read_metrics(str(run_dir))[-1]
    assert result.metrics["step"] == STEPS == last["step"] and result.metrics["loss"] == last["loss"]
    assert "eval_loss" in result.metrics and result.metrics["checkpoint_step"] == STEPS
    # Ray's table has a row per reported checkpoint (reports are at least REPORT_GAP_S apart:
    # commits in between go as the newest), each one trainkit committed, the last one last.
    reported = list(result.metrics_dataframe["checkpoint_step"])
    assert reported[-1] == STEPS and set(reported) <= {EVERY, STEPS} and reported == sorted(reported)
    # The checkpoint: a pointer to trainkit's committed one, under Ray's storage; nothing copied.
    ckpt = Path(result.checkpoint.path)
    assert ckpt.is_relative_to(storage) and sorted(p.name for p in ckpt.iterdir()) == [POINTER_FILE]
    pointer = json.loads((ckpt / POINTER_FILE).read_text())
    assert pointer["format"] == POINTER_FORMAT and pointer["step"] == STEPS
    target = Path(pointer["checkpoint"])
    assert target.is_dir() and (target / rundir.MANIFEST).exists()
    assert int((run_dir / rundir.CHECKPOINTS / rundir.LATEST).read_text()) == STEPS  # trainkit's truth
    ray_bytes = sum(f.stat().st_size for f in storage.rglob("*") if f.is_file())
    ckpt_bytes = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    assert ray_bytes < ckpt_bytes, (ray_bytes, ckpt_bytes)
    assert os.listdir(run_dir / rundir.CHECKPOINTS)  # trainkit's own checkpoints stay where they were
