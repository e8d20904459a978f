"""Ray launcher and sweep pieces that need no cluster: fast."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from launching import RESNET_TINY, launch
from trainkit.components import LAUNCHERS
from trainkit.errors import ConfigError
from trainkit.launch.compose import compose_config
from trainkit.launch.ray import RayLauncher, RayOptions, drain
from trainkit.launch.ray.exits import WorkerExit, explain
from trainkit.launch.ray.launcher import ray_storage, result_exit, worker_cfg
from trainkit.launch.ray.stop import CRASH_REPEATS, repeated_crash
from trainkit.launch.ray.worker import crash_signature, ray_worker_main
from trainkit.launch.sweep import expand, plan, trial_name


def test_ray_is_a_registered_launcher():
    assert "ray" in LAUNCHERS.names() and "local" in LAUNCHERS.names()
    assert LAUNCHERS.get("ray") is RayLauncher and RayLauncher.Options is RayOptions


def test_ray_options_validate_without_importing_ray():
    """Config validation reads RayOptions; only running a job may import Ray."""
    code = ("import sys; from trainkit.launch.compose import compose_config; "
            "cfg = compose_config(['recipe=resnet', 'launcher=ray']); "
            "assert type(cfg.launcher).__name__ == 'RayOptions', cfg.launcher; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_launcher_ray_recipe_defaults():
    cfg = compose_config(["recipe=resnet", "launcher=ray"])
    lc = cfg.launcher
    assert (lc.name, lc.workers, lc.address, lc.max_failures) == ("ray", 2, "", -1)
    assert cfg.strategy.name == "ddp"  # several workers need a data-parallel strategy
    assert compose_config(["recipe=resnet", "launcher=ray", "strategy=fsdp"]).strategy.name == "fsdp"
    cfg = compose_config(["recipe=resnet", "launcher=ray", "launcher.address=ray://head:10001",
                          "launcher.gpus_per_worker=1", "launcher.max_failures=3"])
    assert cfg.launcher.address == "ray://head:10001" and cfg.launcher.gpus_per_worker == 1.0


def test_worker_cfg_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["recipe=resnet", "launcher=ray", "run_dir=runs/r1", "data.cache_dir=cache"])
    data = worker_cfg(cfg)
    assert data["run_dir"] == str(tmp_path / "runs" / "r1")
    assert data["data"]["cache_dir"] == str(tmp_path / "cache")
    assert ray_storage(data["run_dir"]) == str(tmp_path / "runs" / "r1" / "ray")
    assert ray_storage("s3://bucket/runs/r1").startswith("/")  # Ray's own state stays local


def test_sweep_expansion_uses_hydra_grammar():
    trials = expand(["recipe=resnet", "optim.lr=1e-3,3e-3", "trainer.max_steps=range(1,3)"])
    assert len(trials) == 4
    assert trials[0] == ["recipe=resnet", "optim.lr=0.001", "trainer.max_steps=1"]
    assert expand(["model.blocks=[1,1]", "optim.lr=choice(0.1,0.2)"])[1] == ["model.blocks=[1,1]", "optim.lr=0.2"]
    with pytest.raises(ConfigError, match="INTERVAL"):
        expand(["optim.lr=interval(0,1)"])


def test_sweep_plan_gives_each_trial_a_run_dir(tmp_path):
    planned = plan(["recipe=resnet", "optim.lr=0.1,0.2", "strategy=ddp,fsdp", "launcher=ray",
                    f"run_dir={tmp_path}"])
    dirs = [cfg.run_dir for _, cfg in planned]
    assert dirs == [f"{tmp_path}/trial-0-lr=0.1_strategy=ddp", f"{tmp_path}/trial-1-lr=0.1_strategy=fsdp",
                    f"{tmp_path}/trial-2-lr=0.2_strategy=ddp", f"{tmp_path}/trial-3-lr=0.2_strategy=fsdp"]
    assert [p for p, _ in planned][3] == ["optim.lr=0.2", "strategy=fsdp"]
    assert trial_name(7, ["data.url=s3://b/x y"], ["data.url"]) == "trial-7-url=s3_b_x_y"
    default = plan(["recipe=resnet", "optim.lr=0.1,0.2"])
    assert default[0][1].run_dir.endswith("runs/resnet-sweep/trial-0-lr=0.1")


def test_sweep_rejects_a_bad_trial_before_starting_any(tmp_path):
    with pytest.raises(ConfigError, match=r"trial 1 \(optim.lr=-1\)"):
        plan(["recipe=resnet", "optim.lr=0.1,-1"])
    with pytest.raises(ConfigError, match=r"trial 1 .*placement_strategy='FOO' is not valid"):
        plan(["recipe=resnet", "launcher=ray", "launcher.placement_strategy=PACK,FOO"])
    with pytest.raises(ConfigError, match="nccl needs GPU workers"):
        compose_config(["recipe=resnet", "launcher=ray", "strategy.backend=nccl"])
    with pytest.raises(ConfigError, match="run_dir cannot be swept"):
        plan(["recipe=resnet", f"run_dir={tmp_path}/a,{tmp_path}/b"])
    # Through the CLI: exit 2, one line, no run directory created.
    proc = launch("-m", *RESNET_TINY, "optim.lr=0.1,-1", "launcher=ray", f"run_dir={tmp_path}/s", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "trial 1" in proc.stderr and "must be > 0" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_local_sweep_runs_trials_in_turn(tmp_path):
    proc = launch("-m", *RESNET_TINY, "trainer.max_steps=2", "optim.lr=0.01,0.02", f"run_dir={tmp_path}",
                  timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial-0-lr=0.01", "trial-1-lr=0.02"]
    assert "sweep results:" in proc.stdout and proc.stdout.count(" done ") + proc.stdout.count(" done\n") >= 2


# -- how a worker's end reaches Ray and the driver (public API: values, not a failure policy) --


def _group_error(*exits):
    """A worker group failure as Ray's controller builds it from the workers' exceptions."""
    from ray.train import WorkerGroupError

    return WorkerGroupError("boom", dict(enumerate(exits)))


def test_explain_names_the_worker_error_that_explains_the_job():
    err = _group_error(WorkerExit(2, "trainkit: bad"), WorkerExit(1, "lost a peer worker (x)"))
    assert explain(err) == (2, "worker rank 0: trainkit: bad")
    crash = _group_error(RuntimeError("bug"), WorkerExit(1, "lost a peer worker (x)"))
    assert explain(crash) == (1, "worker rank 1: lost a peer worker (x)")


def test_result_exit_reads_rank_zeros_return_value():
    class Result:
        return_value = {"exit_code": 2, "message": "trainkit: no bucket", "summary": None}

    assert result_exit(Result()) == (2, "trainkit: no bucket")
    Result.return_value = {"exit_code": 0, "message": "", "summary": {"steps": 3}}
    assert result_exit(Result()) == (0, "")
    Result.return_value = None  # a training function of one's own
    assert result_exit(Result()) == (0, "")


def test_a_repeating_crash_gives_up_and_anything_else_resets():
    bug = crash_signature(ValueError("shapes do not match\ntraceback..."))
    assert bug == "ValueError: shapes do not match"
    assert crash_signature(WorkerExit(75, "preempted at step 4")) is None
    assert crash_signature(WorkerExit(1, "lost a peer worker (Connection closed by peer)")) is None
    history: list = []
    for _ in range(CRASH_REPEATS - 1):
        assert repeated_crash(history, bug) is None
    assert repeated_crash(history, None) is None  # a lost node in between: bad luck, not the bug
    for _ in range(CRASH_REPEATS - 1):
        assert repeated_crash(history, bug) is None
    assert repeated_crash(history, "RuntimeError: other") is None
    assert repeated_crash(history, "RuntimeError: other") is None
    assert "the same error 3 times in a row" in repeated_crash(history, "RuntimeError: other")


def test_request_stop_reaches_running_watchers():
    from trainkit.preemption import PreemptionWatcher

    a, b, idle = (PreemptionWatcher(signals=[]) for _ in range(3))
    a.start()
    b.start()
    try:
        assert drain.request_stop("ray node drain (x)") == 2
        assert a.requested and b.requested and a.reason == b.reason == "ray node drain (x)"
        assert not idle.requested  # never started: not listening
    finally:
        a.stop()
        b.stop()
    assert drain.request_stop("later") == 0


def test_worker_main_translates_outcomes(monkeypatch):
    import trainkit.train
    from trainkit.errors import Preempted, StorageError

    seen = {}

    def fake_train(cfg):
        seen["signals"] = cfg["preemption"]["signals"]
        raise seen.pop("raise")

    monkeypatch.setattr(trainkit.train, "train", fake_train)
    for exc, code, returned in ((Preempted("preempted at step 3"), 75, False), (StorageError("no bucket"), 2, True),
                                (ConfigError("bad"), 2, True), (RuntimeError("Connection closed by peer"), 1, False)):
        seen["raise"] = exc
        box = {}

        def run():
            try:
                box["value"] = ray_worker_main({"preemption": {"signals": ["SIGTERM"], "poll_seconds": 5}})
            except WorkerExit as e:
                box["exit"] = e

        t = threading.Thread(target=run)  # Ray Train runs the function in a thread, too
        t.start()
        t.join()
        # A config or store error is a value (Ray must not retry it); the rest raise for Ray to restart.
        got = box["value"]["exit_code"] if returned else box["exit"].exit_code
        assert got == code and ("exit" in box) is not returned, (exc, box)
        assert seen["signals"] == []  # no signal handlers outside the main thread
    import ray

    assert not ray.is_initialized()  # outside a Ray worker nothing may start (or join) a Ray


def test_warm_pool_slots_per_node():
    from trainkit.launch.ray.warm_pool import slots

    assert slots({"CPU": 8.0}, 1.0, 0.0) == 8
    assert slots({"CPU": 8.0, "GPU": 2.0}, 2.0, 1.0) == 2  # GPUs bound it
    assert slots({"CPU": 0.0}, 1.0, 0.0) == 0  # the 0-CPU head hosts no worker
    assert slots({"CPU": 4.0}, 0.0, 0.0) == 0  # a worker needing nothing: no idea where it goes
    assert slots({"CPU": 3.0}, 2.0, 0.0) == 1


def test_warm_pool_counts_only_fresh_heartbeats():
    from trainkit.launch.ray.warm_pool import STALE_S, idle_processes

    now = 1000.0
    beats = {
        b"01000000/nodeA/e1/11": str(now - 0.5).encode(),
        b"01000000/nodeA/e1/12": str(now - STALE_S - 1).encode(),  # gone: its node died or it became an actor
        b"01000000/nodeB/e1/13": str(now).encode(),
        b"01000000/nodeB/e2/16": str(now).encode(),  # another runtime env: no use to our workers
        b"01000000/nodeB/e1/14": None,  # deleted while we listed
        b"01000000/nodeB/e1/15": b"garbage",
    }
    assert sorted((n, p) for _, n, p in idle_processes(beats, now, env="e1")) == [("nodeA", 11), ("nodeB", 13)]
    assert len(idle_processes(beats, now)) == 3


def test_warm_standby_is_validated():
    with pytest.raises(ConfigError, match="launcher.warm_standby"):
        compose_config(["recipe=resnet", "launcher=ray", "launcher.warm_standby=-1"])
    with pytest.raises(ConfigError, match="launcher.warm_refill_s"):
        compose_config(["recipe=resnet", "launcher=ray", "launcher.warm_refill_s=-1"])
    assert compose_config(["recipe=resnet", "launcher=ray"]).launcher.warm_standby == 0  # experimental: opt-in


@pytest.mark.parametrize("address, standby, warm", [("127.0.0.1:6379", 1, True), ("127.0.0.1:6379", 0, False),
                                                     ("ray://10.0.0.1:10001", 1, False), ("", 1, False)])
def test_only_training_workers_get_the_preload_hook(address, standby, warm):
    """The hook is in the workers' runtime env (not the job's): Ray Train's controller and
    helper actors start without importing torch; no warm standby (the default), no hook."""
    from trainkit.launch.ray.launcher import build_trainer
    from trainkit.launch.ray.warm_pool import preload_env

    cfg = compose_config(["recipe=resnet", "launcher=ray", f"launcher.address={address}",
                          f"launcher.warm_standby={standby}"])
    env = build_trainer(cfg).run_config.worker_runtime_env["env_vars"]
    (key, value), = preload_env().items()
    assert (env.get(key) == value == "trainkit.launch.ray.warm_pool.preload") is warm
    assert warm or key not in env


def test_trainer_uses_rays_public_failure_and_checkpoint_config():
    from ray.train.torch import TorchTrainer

    from trainkit.launch.ray.launcher import build_trainer
    from trainkit.launch.ray.stop import FLAG_ENV

    cfg = compose_config(["recipe=resnet", "launcher=ray", "launcher.max_failures=3",
                          "launcher.max_preemption_failures=5", "checkpoint.keep_last=4"])
    trainer = build_trainer(cfg, flag="trainkit-stop-x")
    assert isinstance(trainer, TorchTrainer)  # its failure handling is Ray's own
    rc = trainer.run_config
    assert (rc.failure_config.max_failures, rc.failure_config.max_preemption_failures) == (3, 5)
    assert rc.checkpoint_config.num_to_keep == 4
    assert rc.worker_runtime_env["env_vars"][FLAG_ENV] == "trainkit-stop-x"
    with pytest.raises(ConfigError, match="launcher.max_preemption_failures"):
        compose_config(["recipe=resnet", "launcher=ray", "launcher.max_preemption_failures=-2"])
