"""The run's configuration: one typed section per concern, validated before any worker starts.

Hydra composes the recipe into a plain mapping; :func:`load_config` turns it into these
dataclasses (see :mod:`trainkit.options` for the checks). The ``strategy`` and ``launcher``
sections are the options of the component their ``name`` picks (``trainkit.components``):
a plug-in named ``pkg.module:Class`` declares its own ``Options`` and is validated like a
built-in. Workers receive the already-validated mapping, so a bad override never costs a
process launch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from trainkit import storage
from trainkit.components import AUTO_STRATEGY, LAUNCHERS, STRATEGIES, TASKS
from trainkit.cost.prices import CostConfig
from trainkit.distributed import expected_world_size
from trainkit.errors import ConfigError
from trainkit.optim import OptimConfig
from trainkit.options import Options, build, options_class, positive
from trainkit.strategies.base import StrategyOptions


@dataclass
class DataConfig:
    # Empty: the recipe's dataset in the embedded store (a local directory), prepared on first use.
    url: str = ""
    # The reader: auto (what data.url holds: a trainkit index.json, else .parquet files, else
    # .arrow files as save_to_disk writes them, else .tar files with their wds-index.json; an MDS
    # index.json), or one of trainkit.data.source.READERS by name.
    format: Literal["auto", "trainkit", "parquet", "arrow", "webdataset", "mds"] = "auto"
    # Global samples per optimizer step, over all ranks and accumulation micro-steps; keeping it
    # global is what lets a run resume on another world size with the same optimisation.
    batch_size: int = 64
    num_workers: int = 0
    shuffle: bool = True
    # Shards of this many consecutive (shuffled) shards are mixed together; bounds the cache.
    shuffle_window: int = 8
    cache_dir: str = ""
    cache_bytes: int = 1 << 30
    # Concurrent shard downloads per rank (its loader workers share them); -1: sized from the
    # shard size and the store's latency (trainkit.data.stream.downloads_for).
    prefetch: int = -1

    def check(self, cfg: Config) -> None:
        positive("data.batch_size", self.batch_size)
        positive("data.num_workers", self.num_workers, allow_zero=True)
        positive("data.shuffle_window", self.shuffle_window)
        positive("data.cache_bytes", self.cache_bytes)
        if self.prefetch < -1:
            raise ConfigError(f"data.prefetch={self.prefetch}: -1 (sized from the store) or 0 and more")


@dataclass
class TrainerConfig:
    max_steps: int = 100
    log_every: int = 10
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = 1
    # Max global gradient norm; 0 disables clipping.
    grad_clip: float = 0.0
    activation_checkpointing: bool = False
    compile: bool = False
    # The recipe builds the model on the meta device; the strategy gives it storage and its
    # init (fsdp: after sharding, so each rank allocates only its shard).
    meta_init: bool = False
    # Intra-op threads per worker; 0 splits this machine's cores between local workers.
    threads: int = 0
    progress: Literal["auto", "bar", "plain", "off"] = "auto"
    # Extra metric sinks besides metrics.jsonl: tensorboard, wandb, mlflow or pkg.module:Class
    # (rank 0 only).
    loggers: list[str] = field(default_factory=list)
    # Options per logger, e.g. {"wandb": {"project": "p"}}; checked against the logger's Options.
    logger_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def check(self, cfg: Config) -> None:
        positive("trainer.max_steps", self.max_steps)
        positive("trainer.log_every", self.log_every)
        positive("trainer.grad_accum", self.grad_accum)
        positive("trainer.grad_clip", self.grad_clip, allow_zero=True)
        positive("trainer.threads", self.threads, allow_zero=True)
        if self.meta_init and cfg.strategy.name == "deepspeed":
            raise ConfigError("trainer.meta_init is not supported with strategy=deepspeed (its engine needs "
                              "materialised parameters; ZeRO-3 has deepspeed.zero.Init for this)")
        from trainkit.metrics.loggers import check_logger_options

        check_logger_options(self.loggers, self.logger_options)


@dataclass
class LauncherOptions(Options):
    """Where the workers run; each launcher (``trainkit.launch``) extends this with its own keys."""

    name: str = "local"
    workers: int = 1
    nodes: int = 1

    def check(self, cfg: Config) -> None:
        positive("launcher.workers", self.workers)
        positive("launcher.nodes", self.nodes)

    @property
    def world_size(self) -> int:
        return self.workers * self.nodes


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
    # Also export the weights every N steps into exports/step_N/ (0: only at the end).
    export_every_steps: int = 0
    # Warm start when the run has no committed checkpoint of its own (its own latest always
    # wins): another run_dir[@STEP], a .safetensors file or a Hugging Face-style directory.
    load_from: str = ""
    # Also the optimizer state (run_dir sources only).
    load_optimizer: bool = False
    # Missing / unexpected keys are an error (false: warn and load the keys both have).
    strict: bool = True
    # Resume even when the config changes the state tree (model.*, optim.name, ...).
    allow_config_change: bool = False

    def check(self, cfg: Config) -> None:
        positive("checkpoint.every_steps", self.every_steps, allow_zero=True)
        positive("checkpoint.every_seconds", self.every_seconds, allow_zero=True)
        positive("checkpoint.keep_last", self.keep_last)
        positive("checkpoint.keep_every", self.keep_every, allow_zero=True)
        positive("checkpoint.io_threads", self.io_threads)
        positive("checkpoint.export_every_steps", self.export_every_steps, allow_zero=True)
        if self.load_from and cfg.strategy.name == "deepspeed":
            # Once DeepSpeed's engine is built, its optimizer holds its own (partitioned,
            # fp32) copy of the weights; loading into the module would not reach it.
            raise ConfigError("checkpoint.load_from is not supported with strategy=deepspeed; warm-start "
                              "with fsdp or ddp, or load the weights into the model before Run.setup")


@dataclass
class PreemptionConfig:
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    # Seconds from a notice to the forced stop (AWS gives 120, GCP 30): the emergency save
    # must fit. trainkit measures what a save takes and warns once when it does not fit.
    grace_seconds: float = 25.0
    # Metadata pollers are off unless an endpoint is given (tests use a loopback fake).
    aws_endpoint: str = ""
    gcp_endpoint: str = ""
    poll_seconds: float = 5.0
    # The ranks agree on a stop or a timer save at most this often (in whole steps; 0: every
    # step). A stop lands at most this much plus one step after the notice.
    agree_every_s: float = 0.5

    def check(self, cfg: Config) -> None:
        positive("preemption.grace_seconds", self.grace_seconds)
        positive("preemption.poll_seconds", self.poll_seconds)
        positive("preemption.agree_every_s", self.agree_every_s, allow_zero=True)
        valid = sorted(s.name for s in signal.Signals)
        for name in self.signals:
            if name not in valid:
                raise ConfigError(f"preemption.signals: {name!r} is not a signal; e.g. SIGTERM, SIGINT, SIGUSR1")


# A leaver's heartbeat counts as expired this long after the lighthouse's timeout (the last
# heartbeat may land just after the Manager is shut down; the lighthouse ticks every 100 ms).
FT_STALE_MARGIN_S = 0.2


@dataclass
class FaultToleranceConfig:
    """``ft.mode=replicas``: replica groups each hold the whole model; a torchft lighthouse forms a
    quorum every step, a lost group drops out of the next step while the others go on, and its
    replacement heals from a live peer (docs/fault-tolerance.md)."""

    mode: Literal["off", "replicas"] = "off"
    # Replica groups (one process each in this version); each step's global batch is cut into
    # this many fixed chunks, dealt over the groups that take part in the step.
    groups: int = 2
    # Fewest groups that may commit a step; = groups waits for a lost group's replacement.
    min_replicas: int = 1
    # A group silent for this long is dropped from the next quorum.
    heartbeat_timeout_s: float = 1.0
    # The longest a replacement may take from its start to its first quorum (process start,
    # imports, model build): the quorum timeout must exceed it, or the wait for it is fatal.
    replacement_s: float = 60.0
    # How long a group waits for a quorum; fatal when exceeded (torchft does not retry it).
    quorum_timeout_s: float = 120.0
    # A collective or a peer transfer stuck this long counts as a lost peer.
    timeout_s: float = 30.0
    # Replacements the local launcher starts per group before it gives up on the job.
    max_restarts: int = 5

    @property
    def leave_after_s(self) -> float:
        """How long a group with a notice keeps training before it leaves (its heartbeat expiry)."""
        return self.heartbeat_timeout_s + FT_STALE_MARGIN_S

    def check(self, cfg: Config) -> None:
        if self.mode == "off":
            return
        positive("ft.groups", self.groups)
        positive("ft.heartbeat_timeout_s", self.heartbeat_timeout_s)
        positive("ft.timeout_s", self.timeout_s)
        positive("ft.max_restarts", self.max_restarts, allow_zero=True)
        if not 1 <= self.min_replicas <= self.groups:
            raise ConfigError(f"ft.min_replicas={self.min_replicas} must be between 1 and ft.groups={self.groups}")
        if self.quorum_timeout_s <= self.replacement_s + self.heartbeat_timeout_s:
            raise ConfigError(
                f"ft.quorum_timeout_s={self.quorum_timeout_s} must exceed ft.replacement_s + ft.heartbeat_timeout_s "
                f"= {self.replacement_s + self.heartbeat_timeout_s}: a replacement may take that long to join")
        if cfg.preemption.grace_seconds <= self.leave_after_s:
            raise ConfigError(
                f"preemption.grace_seconds={cfg.preemption.grace_seconds} must exceed ft.heartbeat_timeout_s + "
                f"{FT_STALE_MARGIN_S} = {self.leave_after_s:g}: a group with a notice trains until its heartbeat "
                f"has expired, then leaves")
        one = cfg.launcher.name in ("local", "ray") and cfg.strategy.name == "ddp" and cfg.launcher.workers == 1
        several = cfg.launcher.name == "local" and cfg.strategy.name in ("ddp", "fsdp") and cfg.launcher.workers >= 2
        if not (one or several):
            raise ConfigError("ft.mode=replicas runs with launcher=local or launcher=ray, strategy=ddp and "
                              "launcher.workers=1 (one process per replica group), or with launcher=local, "
                              "strategy=ddp or fsdp and launcher.workers >= 2 (processes per group, the model "
                              "replicated or sharded over them), in this version")
        per_step = self.groups * cfg.launcher.workers
        if cfg.trainer.grad_accum != 1 or cfg.data.batch_size % per_step:
            raise ConfigError(f"ft.mode=replicas needs trainer.grad_accum=1 and data.batch_size a multiple of "
                              f"ft.groups x launcher.workers = {per_step}")


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
    strategy: StrategyOptions = field(default_factory=StrategyOptions)
    launcher: LauncherOptions = field(default_factory=LauncherOptions)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    ft: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    # What the capacity costs an hour (summary.json's cost_usd): trainkit.cost.prices.
    cost: CostConfig = field(default_factory=CostConfig)
    # fsspec storage options per protocol, e.g. {"s3": {"endpoint_url": "http://127.0.0.1:9000"}}.
    # Prefer environment variables or instance roles for credentials; values of credential-like
    # keys are redacted wherever the config is written (trainkit.redact).
    storage: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sections(self) -> list[Any]:
        """Every section that has a ``check``, in the order errors should be reported."""
        return [self.strategy, self.launcher, self.trainer, self.data, self.optim, self.checkpoint,
                self.preemption, self.cost, self.ft]


def check_batch(cfg: Config, world: int) -> int:
    """The per-rank micro-batch; the global batch must split evenly over ranks and micro-steps."""
    micro, rest = divmod(cfg.data.batch_size, world * cfg.trainer.grad_accum)
    if rest or not micro:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be a multiple of workers x grad_accum "
            f"= {world} x {cfg.trainer.grad_accum}"
        )
    return micro


def world_size(cfg: Config) -> int:
    """The processes this config trains on: torchrun's (or Ray's) when set, else the launcher's."""
    return expected_world_size(cfg.launcher.world_size)


def resolve_strategy(name: str, world: int) -> str:
    """``auto`` is ``single`` for one process and ``ddp`` for more; other names stand."""
    if name != AUTO_STRATEGY:
        return name
    return "single" if world == 1 else "ddp"


def load_config(data: typing.Mapping[str, Any]) -> Config:
    """Builds and validates a :class:`Config` from a plain (Hydra-composed) mapping."""
    data = dict(data)
    launcher_raw = dict(data.pop("launcher", None) or {})
    strategy_raw = dict(data.pop("strategy", None) or {})
    cfg = build(Config, data, "")
    launcher_name = str(launcher_raw.get("name", LauncherOptions.name))
    launcher_cls = options_class(LAUNCHERS.get(launcher_name, "launcher"), LauncherOptions, "launcher")
    cfg.launcher = build(launcher_cls, launcher_raw, "launcher")
    name = resolve_strategy(str(strategy_raw.get("name", StrategyOptions.name)), world_size(cfg))
    strategy_cls = options_class(STRATEGIES.get(name, "strategy"), StrategyOptions, "strategy")
    cfg.strategy = build(strategy_cls, {**strategy_raw, "name": name}, "strategy")
    return validate(cfg)


# ``python -m trainkit.launch script=...`` hands each worker the settings given on its command
# line as JSON here; they are laid over the config the script builds (the command line wins,
# as it does over a recipe). A component section whose ``name`` changes is replaced whole.
LAUNCH_SETTINGS_ENV = "TRAINKIT_LAUNCH_SETTINGS"
# Runs built in this process with those settings: the script launcher checks the script made one.
launched_runs = 0


def launch_environment(data: typing.Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with what the launching environment says laid over it.

    ``ACCELERATE_MIXED_PRECISION`` (``accelerate launch --mixed_precision``) sets
    ``trainer.precision`` unless that names another precision (one line, exit 2); ``no``
    (Accelerate's default) leaves it as it is.
    """
    global launched_runs
    out = dict(data)
    raw = os.environ.get(LAUNCH_SETTINGS_ENV)
    if raw is not None:
        launched_runs += 1
        out = _overlay(out, json.loads(raw))
    wanted = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if wanted != "no":
        trainer = dict(out.get("trainer") or {})
        have = trainer.get("precision", "fp32")
        if wanted not in ("bf16", "fp16"):
            raise ConfigError(f"ACCELERATE_MIXED_PRECISION={wanted}: trainkit trains in fp32, bf16 or fp16")
        if have not in ("fp32", wanted):
            raise ConfigError(f"ACCELERATE_MIXED_PRECISION={wanted} contradicts trainer.precision={have}; "
                              "set one of them")
        out["trainer"] = {**trainer, "precision": wanted}
    return out


def _overlay(base: typing.Mapping[str, Any], top: typing.Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        if dataclasses.is_dataclass(below):
            below = dataclasses.asdict(below)
        same_component = not isinstance(value, dict) or "name" not in value or (
            isinstance(below, typing.Mapping) and below.get("name", value["name"]) == value["name"])
        if isinstance(value, dict) and isinstance(below, typing.Mapping) and same_component:
            out[key] = _overlay(below, value)
        else:
            out[key] = value
    return out


def validate(cfg: Config) -> Config:
    """Checks that need no worker: each section's own checks, then the task's model keys."""
    if cfg.task:
        task = TASKS.get(cfg.task, "task")
        cfg.model = dataclasses.asdict(build(task.model_config, cfg.model, "model"))
    for section in cfg.sections():
        section.check(cfg)
    storage.check_options(cfg.storage)
    check_batch(cfg, world_size(cfg))
    return cfg


def run_dir_default(recipe: str) -> str:
    return os.path.join(os.getcwd(), "runs", recipe or "run")
