"""Everything a config picks by name, in one table: name → the class that implements it.

Built-ins are listed by import path and imported only when picked. A user's own component
is named by its import path in a recipe (``strategy: {name: "mypkg.mod:MyStrategy"}``) and
is resolved, validated and built exactly like these. A component class carries its typed
options as the class attribute ``Options`` (a dataclass with a ``check(cfg)`` method);
see docs/architecture.md for the protocol each kind implements.
"""

from __future__ import annotations

from typing import Any

from trainkit.registry import Registry

# Factories (classes), not instances: the config resolves ``Options`` from them, the run or
# the launcher builds them.
STRATEGIES: Registry[Any] = Registry("strategy")
STRATEGIES.add_path("single", "trainkit.strategies.base:Strategy")
STRATEGIES.add_path("ddp", "trainkit.strategies.ddp:DDPStrategy")
STRATEGIES.add_path("fsdp", "trainkit.strategies.fsdp:FSDPStrategy")
STRATEGIES.add_path("deepspeed", "trainkit.strategies.deepspeed:DeepSpeedStrategy")
STRATEGIES.add_path("accelerate", "trainkit.strategies.accelerate:AccelerateStrategy")

LAUNCHERS: Registry[Any] = Registry("launcher")
LAUNCHERS.add_path("local", "trainkit.launch.local:LocalLauncher")
LAUNCHERS.add_path("ray", "trainkit.launch.ray:RayLauncher")

LOGGERS: Registry[Any] = Registry("logger")
LOGGERS.add_path("tensorboard", "trainkit.metrics.loggers:TensorBoardLogger")
LOGGERS.add_path("wandb", "trainkit.metrics.loggers:WandbLogger")
LOGGERS.add_path("mlflow", "trainkit.metrics.loggers:MLflowLogger")

# Ray Tune sweeps (``-m ... launcher=ray``): ``sweep.search`` and ``sweep.scheduler``.
SEARCHERS: Registry[Any] = Registry("sweep.search")
SEARCHERS.add_path("random", "trainkit.launch.tune.search:RandomSearch")
SEARCHERS.add_path("grid", "trainkit.launch.tune.search:GridSearch")
SEARCHERS.add_path("optuna", "trainkit.launch.tune.search:OptunaSearch")

SCHEDULERS: Registry[Any] = Registry("sweep.scheduler")
SCHEDULERS.add_path("none", "trainkit.launch.tune.search:NoScheduler")
SCHEDULERS.add_path("asha", "trainkit.launch.tune.search:ASHA")

TASKS: Registry[Any] = Registry("task")
TASKS.add_path("resnet", "trainkit.tasks.resnet:TASK")
TASKS.add_path("gpt", "trainkit.tasks.gpt:TASK")

# Names that are not a component but a rule: resolved from the world size (see config.py).
AUTO_STRATEGY = "auto"
