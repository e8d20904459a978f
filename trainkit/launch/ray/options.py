"""The ``launcher.*`` keys of ``launcher=ray``; importable without Ray, so any config validates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainkit.config import Config, LauncherOptions
from trainkit.errors import ConfigError
from trainkit.options import positive

# Ray's placement group strategies for the worker group's bundles.
Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@dataclass
class RayOptions(LauncherOptions):
    name: str = "ray"
    workers: int = 2
    # "" starts a private Ray on 127.0.0.1 for the command; "auto" or an address joins a
    # cluster; "ray://host:10001" connects through Ray Client.
    address: str = ""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    placement_strategy: Placement = "PACK"
    # Ray's FailureConfig.max_failures: group restarts after a failure, a lost node or an
    # agreed stop for a drain (trainkit restarts at once instead of waiting out the drain's
    # deadline, and Ray counts that as a failure); -1 retries forever (spot); 0 fails at once.
    max_failures: int = -1
    # Ray's FailureConfig.max_preemption_failures: restarts after a node Ray saw reclaimed
    # (its workers killed by the preemption); -1 for ever.
    max_preemption_failures: int = -1
    # Experimental, opt-in (it stands on Ray internals, see trainkit/_compat.py): idle
    # pre-imported worker processes kept per worker slot on each node of a joined cluster
    # (not a private local Ray), so a restarted group starts in seconds
    # (trainkit.launch.ray.warm_pool); 0: off.
    warm_standby: int = 0
    # Seconds the pool waits after a (re)start took its processes before it starts new ones,
    # so their imports do not compete with the group's restore and first steps.
    warm_refill_s: float = 20.0

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        positive("launcher.cpus_per_worker", self.cpus_per_worker, allow_zero=True)
        positive("launcher.gpus_per_worker", self.gpus_per_worker, allow_zero=True)
        if self.max_failures < -1:
            raise ConfigError(f"launcher.max_failures={self.max_failures} must be >= 0, or -1 (retry for ever)")
        if self.max_preemption_failures < -1:
            raise ConfigError(f"launcher.max_preemption_failures={self.max_preemption_failures} must be >= 0, "
                              "or -1 (retry for ever)")
        positive("launcher.warm_standby", self.warm_standby, allow_zero=True)
        positive("launcher.warm_refill_s", self.warm_refill_s, allow_zero=True)
        if cfg.strategy.backend == "nccl" and not self.gpus_per_worker:
            raise ConfigError("strategy.backend=nccl needs GPU workers: set launcher.gpus_per_worker=1 (or backend gloo)")
