"""Typed configuration: one dataclass per component, validated before any worker starts.

Hydra composes the recipe into a plain mapping; :func:`load_config` turns it into these
dataclasses, rejecting unknown keys and ill-typed values with one line that names the key
and what would have been valid. Workers receive the already-validated mapping, so a bad
override never costs a process launch.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from trainkit.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "sgd")
BACKENDS = ("auto", "gloo", "nccl")
PROGRESS = ("auto", "bar", "plain", "off")


@dataclass
class DataConfig:
    # Empty: the recipe's dataset in the embedded store (a local directory), prepared on first use.
    url: str = ""
    # Global samples per optimizer step, over all ranks and accumulation micro-steps; keeping it
    # global is what lets a run resume on another world size with the same optimisation.
    batch_size: int = 64
    num_workers: int = 0
    shuffle: bool = True
    # Shards of this many consecutive (shuffled) shards are mixed together; bounds the cache.
    shuffle_window: int = 8
    cache_dir: str = ""
    cache_bytes: int = 1 << 30
    prefetch: int = 4


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    max_steps: int = 100
    log_every: int = 10
    precision: str = "fp32"
    grad_accum: int = 1
    # Max global gradient norm; 0 disables clipping.
    grad_clip: float = 0.0
    activation_checkpointing: bool = False
    compile: bool = False
    # Intra-op threads per worker; 0 splits this machine's cores between local workers.
    threads: int = 0
    progress: str = "auto"
    # Extra metric sinks besides metrics.jsonl: tensorboard, wandb, mlflow (rank 0 only).
    loggers: list[str] = field(default_factory=list)
    # Keyword arguments per logger, e.g. {"wandb": {"project": "p"}}.
    logger_options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class StrategyConfig:
    name: str = "single"
    backend: str = "auto"
    zero_stage: int = 2
    reshard_after_forward: bool = True
    find_unused_parameters: bool = False


@dataclass
class LauncherConfig:
    name: str = "local"
    workers: int = 1
    nodes: int = 1
    # 0 picks a free port on loopback.
    master_port: int = 0
    # Ray only.
    address: str = ""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    placement_strategy: str = "PACK"
    # -1 retries forever (spot); 0 fails on the first lost worker.
    max_failures: int = -1
    # Idle pre-imported worker processes kept per worker slot on each node of a joined
    # cluster (not a private local Ray), so a restarted group starts in seconds
    # (trainkit.launch.warm_pool); 0: off.
    warm_standby: int = 1
    # Seconds the pool waits after a (re)start took its processes before it starts new ones,
    # so their imports do not compete with the group's restore and first steps.
    warm_refill_s: float = 20.0


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_steps: int = 0
    every_seconds: float = 0.0
    keep_last: int = 2
    # Also keep every K-th step forever (0: none).
    keep_every: int = 0
    async_save: bool = True
    # Copy tensors to host memory during the next forward/backward instead of inside save();
    # the optimizer step waits for the copy. Off: save() blocks for the copy.
    overlap_staging: bool = True
    # Files each rank writes and reads in parallel per checkpoint.
    io_threads: int = 2
    export_safetensors: bool = True


@dataclass
class PreemptionConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    # Seconds the emergency checkpoint may take before the process gives up and exits.
    grace_seconds: float = 25.0
    # Metadata pollers are off unless an endpoint is given (tests use a loopback fake).
    aws_endpoint: str = ""
    gcp_endpoint: str = ""
    poll_seconds: float = 5.0


@dataclass
class Config:
    task: str = ""
    recipe: str = ""
    # Identifies the run: relaunching with the same run_dir resumes it. Local path or fsspec URL.
    run_dir: str = ""
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    # fsspec storage options per protocol, e.g. {"s3": {"endpoint_url": "http://127.0.0.1:9000"}}.
    storage: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; valid: {', '.join(valid)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config) -> Config:
    """Checks that need no worker: names, ranges, and the combinations that cannot work."""
    from trainkit.strategies import STRATEGIES
    from trainkit.tasks import TASKS

    if cfg.task:
        task = TASKS.get(cfg.task, "task")
        cfg.model = dataclasses.asdict(_build(task.model_config, cfg.model, "model"))
    STRATEGIES.get(cfg.strategy.name, "strategy")
    _choice("strategy.backend", cfg.strategy.backend, BACKENDS)
    if cfg.strategy.zero_stage not in (1, 2, 3):
        raise ConfigError(f"strategy.zero_stage={cfg.strategy.zero_stage} is not valid; valid: 1, 2, 3")
    _choice("trainer.precision", cfg.trainer.precision, PRECISIONS)
    _choice("trainer.progress", cfg.trainer.progress, PROGRESS)
    _choice("optim.name", cfg.optim.name, OPTIMIZERS)
    _choice("optim.schedule", cfg.optim.schedule, SCHEDULES)
    _choice("launcher.name", cfg.launcher.name, ("local", "ray"))
    _positive("trainer.max_steps", cfg.trainer.max_steps)
    _positive("trainer.log_every", cfg.trainer.log_every)
    _positive("trainer.grad_accum", cfg.trainer.grad_accum)
    _positive("trainer.grad_clip", cfg.trainer.grad_clip, allow_zero=True)
    _positive("trainer.threads", cfg.trainer.threads, allow_zero=True)
    _positive("optim.lr", cfg.optim.lr)
    _positive("data.batch_size", cfg.data.batch_size)
    _positive("data.num_workers", cfg.data.num_workers, allow_zero=True)
    _positive("data.shuffle_window", cfg.data.shuffle_window)
    _positive("data.cache_bytes", cfg.data.cache_bytes)
    _positive("launcher.workers", cfg.launcher.workers)
    _positive("launcher.nodes", cfg.launcher.nodes)
    _positive("launcher.warm_standby", cfg.launcher.warm_standby, allow_zero=True)
    _positive("launcher.warm_refill_s", cfg.launcher.warm_refill_s, allow_zero=True)
    _positive("checkpoint.every_steps", cfg.checkpoint.every_steps, allow_zero=True)
    _positive("checkpoint.every_seconds", cfg.checkpoint.every_seconds, allow_zero=True)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    _positive("checkpoint.io_threads", cfg.checkpoint.io_threads)
    if cfg.strategy.name == "single" and cfg.launcher.workers * cfg.launcher.nodes > 1:
        raise ConfigError(
            f"strategy=single runs one process but launcher.workers={cfg.launcher.workers}; "
            "pick strategy=ddp, fsdp or deepspeed"
        )
    check_batch(cfg, cfg.launcher.workers * cfg.launcher.nodes)
    if cfg.trainer.precision == "fp16" and cfg.strategy.name == "fsdp":
        raise ConfigError("trainer.precision=fp16 with strategy=fsdp is not supported; use bf16")
    return cfg


def check_batch(cfg: Config, world: int) -> int:
    """The per-rank micro-batch; the global batch must split evenly over ranks and micro-steps."""
    micro, rest = divmod(cfg.data.batch_size, world * cfg.trainer.grad_accum)
    if rest or not micro:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be a multiple of workers x grad_accum "
            f"= {world} x {cfg.trainer.grad_accum}"
        )
    return micro


def load_config(data: typing.Mapping[str, Any]) -> Config:
    """Builds and validates a :class:`Config` from a plain (Hydra-composed) mapping."""
    return validate(_build(Config, dict(data), ""))


def run_dir_default(recipe: str) -> str:
    return os.path.join(os.getcwd(), "runs", recipe or "run")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if not isinstance(data, typing.Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown key {key!r}; valid keys here: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(hints[name], value, key)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, typing.Mapping):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if tp is Any:
        return value
    raise TypeError(f"config type {tp!r} of {key} is not supported")

