"""The driver side of ``launcher=ray``: one ``TorchTrainer.fit()`` per job, several at once for a sweep."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trainkit import storage
from trainkit.config import Config
from trainkit.errors import ConfigError
from trainkit.launch.base import EXIT_FAILED, JobResult, Launcher, attempt, ignore
from trainkit.launch.ray.exits import explain
from trainkit.launch.ray.options import RayOptions
from trainkit.launch.ray.stop import FLAG_ENV, driver_stop, job_outcome
from trainkit.launch.ray.session import LOOPBACK, check_resources, driver_ip, ray_env, ray_session, warm_standby_on

# Environment the workers need to find the same stores as the driver (not credentials:
# those come from the node's role / service account, see docs/clusters.md).
PROPAGATE_PREFIXES = ("TRAINKIT_", "FSSPEC_", "GCSFS_", "STORAGE_EMULATOR_HOST", "AWS_ENDPOINT_URL")


class RayLauncher(Launcher):
    """``launcher=ray``: each job is a Ray Train worker group; a sweep's jobs share one session."""

    Options = RayOptions

    def run(self, cfg: Config) -> JobResult:
        if cfg.ft.mode == "replicas":
            return attempt(lambda: _replicas(cfg))

        def start() -> tuple[int, str]:
            lc = cfg.launcher
            with ray_session(lc.address, cpus=lc.world_size * lc.cpus_per_worker, launcher=lc) as own:
                check_resources(lc, own_cluster=own and not lc.address)
                print(f"ray: {lc.world_size} workers, run_dir {worker_cfg(cfg)['run_dir']}, "
                      f"max_failures {lc.max_failures}", flush=True)
                with driver_stop(cfg.preemption.signals) as flag:
                    return fit(cfg, flag=flag)

        return attempt(start)

    def run_many(self, cfgs: Sequence[Config], *, started: Callable[[int], None] = ignore,
                 ended: Callable[[int, JobResult], None] = ignore) -> list[JobResult]:
        """Runs the jobs concurrently, one ``fit()`` per driver thread, as many as the cluster holds.

        A private Ray gets room for every job at once (logical CPUs; they share the cores).
        """
        lc = cfgs[0].launcher
        with ray_session(lc.address, cpus=lc.world_size * lc.cpus_per_worker * len(cfgs), launcher=lc) as own:
            for cfg in cfgs:
                check_resources(cfg.launcher, own_cluster=own and not lc.address)
            parallel = _concurrency(cfgs)
            print(f"ray: running {parallel} trial(s) at a time", flush=True)
            results: list[JobResult | None] = [None] * len(cfgs)

            def one(i: int) -> None:
                started(i)
                try:
                    results[i] = attempt(lambda: _fit_trial(cfgs[i], f"trainkit-trial-{i}"))
                except Exception as exc:  # noqa: BLE001 - one job's crash must not hide the others
                    results[i] = JobResult(EXIT_FAILED, f"{type(exc).__name__}: {exc}")
                ended(i, results[i])

            with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="trainkit-trial") as pool:
                list(pool.map(one, range(len(cfgs))))
        return [r or JobResult(EXIT_FAILED, "no result") for r in results]


def _replicas(cfg: Config) -> tuple[int, str]:
    """``ft.mode=replicas``: one Ray Train worker per replica group (trainkit.ft.ray)."""
    from trainkit.config import load_config
    from trainkit.ft.ray import run as run_replicas

    lc, groups = cfg.launcher, cfg.ft.groups
    with ray_session(lc.address, cpus=groups * lc.cpus_per_worker, launcher=lc):
        job = load_config(worker_cfg(cfg))
        env = _propagated_env()
        if driver_ip() in LOOPBACK:
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo would pick the hostname's interface
        print(f"ray: {groups} replica groups (ft.mode=replicas), run_dir {job.run_dir}", flush=True)
        return run_replicas(job, storage_path=ray_storage(job.run_dir), env=env)


def _fit_trial(cfg: Config, name: str) -> tuple[int, str]:
    with driver_stop([]) as flag:
        return fit(cfg, name=name, flag=flag)


def _concurrency(cfgs: Sequence[Config]) -> int:
    """How many jobs the connected cluster holds at once (at least one)."""
    import ray

    total = ray.cluster_resources()
    lc = cfgs[0].launcher
    fits = [total.get("CPU", 0) // max(lc.world_size * lc.cpus_per_worker, 1e-9)]
    if lc.gpus_per_worker:
        fits.append(total.get("GPU", 0) // (lc.world_size * lc.gpus_per_worker))
    return int(max(1, min(len(cfgs), *fits)))


def fit(cfg: Config, *, name: str = "trainkit", flag: str | None = None) -> tuple[int, str]:
    """Runs one job with Ray Train on the connected cluster: (exit code, why it failed).

    ``flag`` names the job's stop flag actor (:func:`~trainkit.launch.ray.stop.driver_stop`).
    """
    from ray.train import TrainingFailedError

    trainer = build_trainer(cfg, name=name, flag=flag)
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        return job_outcome(flag) or explain(exc)
    return result_exit(result)


def result_exit(result: Any) -> tuple[int, str]:
    """The job's exit code and message from rank 0's return value (``Result.return_value``)."""
    value = getattr(result, "return_value", None)
    if isinstance(value, dict) and "exit_code" in value:
        return int(value["exit_code"]), str(value.get("message") or "")
    return 0, ""


def worker_cfg(cfg: Config) -> dict[str, Any]:
    """The config the workers get: local paths absolute (workers may run elsewhere)."""
    data = cfg.to_dict()
    for key in ("run_dir",):
        if data[key] and storage.is_local(data[key]):
            data[key] = os.path.abspath(storage.local_path(data[key]))
    if data["data"]["cache_dir"] and storage.is_local(data["data"]["cache_dir"]):
        data["data"]["cache_dir"] = os.path.abspath(data["data"]["cache_dir"])
    if data["data"]["url"].startswith(("/", ".")):
        data["data"]["url"] = os.path.abspath(data["data"]["url"])
    # One process per worker: the launcher's "nodes" is Ray's business here.
    data["launcher"]["workers"] = cfg.launcher.world_size
    data["launcher"]["nodes"] = 1
    return data


def ray_storage(run_dir: str) -> str:
    """Where Ray Train keeps its own run state and the checkpoint pointers trainkit reports.

    Inside a local run_dir; for one in an object store, on the driver's disk: the pointers
    written there are readable where that disk is (one machine, or a shared file system)."""
    if storage.is_local(run_dir):
        return os.path.join(os.path.abspath(storage.local_path(run_dir)), "ray")
    digest = hashlib.sha1(run_dir.encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "trainkit", "ray", digest)


def _propagated_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(PROPAGATE_PREFIXES)}
    if driver_ip() in LOOPBACK:
        # A worker asks for "its" IP (torch's MASTER_ADDR) from the perspective of the
        # network, not of its raylet: on a loopback-pinned cluster that is the machine's
        # interface. This Ray switch makes it answer 127.0.0.1 (it only matters there).
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def build_trainer(cfg: Config, *, name: str = "trainkit", flag: str | None = None) -> Any:
    """The ``TorchTrainer`` of one job: trainkit's worker function, Ray's failure handling."""
    ray_env()
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainkit.launch.ray.warm_pool import preload_env
    from trainkit.launch.ray.worker import ray_worker_main

    if not hasattr(ray.train, "get_preemption_info"):  # defined only with Ray Train v2 on
        raise ConfigError("launcher=ray needs Ray Train v2 (unset RAY_TRAIN_V2_ENABLED=0)")
    lc = cfg.launcher
    resources: dict[str, float] = {"CPU": lc.cpus_per_worker}
    if lc.gpus_per_worker:
        resources["GPU"] = lc.gpus_per_worker
    backend = cfg.strategy.backend
    if backend == "auto":
        backend = "nccl" if lc.gpus_per_worker else "gloo"
    data = worker_cfg(cfg)
    env = {**_propagated_env(), **(preload_env() if warm_standby_on(lc) else {})}
    if flag:
        env[FLAG_ENV] = flag
    keep = cfg.checkpoint.keep_last if not cfg.checkpoint.keep_every else None
    from trainkit import _compat

    # Without the two default callbacks a trainkit job does not use (see _compat): each
    # restart is seconds faster.
    return _compat.ray_lean_trainer(TorchTrainer)(
        train_loop_per_worker=ray_worker_main,
        train_loop_config=data,
        scaling_config=ScalingConfig(
            num_workers=lc.world_size,
            use_gpu=lc.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=lc.placement_strategy,
        ),
        torch_config=TorchConfig(backend=backend, timeout_s=int(os.environ.get("TRAINKIT_PG_TIMEOUT", 600))),
        run_config=RunConfig(
            name=name,
            storage_path=ray_storage(data["run_dir"]),
            failure_config=FailureConfig(max_failures=lc.max_failures,
                                         max_preemption_failures=lc.max_preemption_failures),
            # Ray keeps the pointers (report.py) of the checkpoints trainkit keeps.
            checkpoint_config=CheckpointConfig(num_to_keep=keep),
            worker_runtime_env={"env_vars": env},
        ),
    )
