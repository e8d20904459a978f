"""``strategy=accelerate``: Hugging Face Accelerate wraps the model and optimizer and runs the step.

``Accelerator.prepare`` wraps model and optimizer (DDP across the launched processes, or its
FSDP plugin on GPUs); ``backward`` (loss scaling for accumulation and fp16), ``no_sync`` on
accumulation micro-steps, ``autocast`` and gradient clipping go through the Accelerator.
trainkit keeps everything around the step: its data stream, its checkpoints (the prepared
objects are saved through the commit protocol like any other strategy's), the preemption
agreement and the metrics.

Accelerate adopts the process group trainkit started. Its plugins need GPUs: on CPU its FSDP
plugin quietly becomes DDP and each rank of its DeepSpeed plugin trains alone (see
shared/STACK-NOTES.md), so here a plugin on CPU, or the ``accelerate launch --use_fsdp`` /
``--use_deepspeed`` environment, is refused with one line before training, and the process
count and parallelism Accelerate reports are checked against trainkit's own.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from trainkit.distributed import DistInfo
from trainkit.errors import ConfigError, TrainkitError
from trainkit.strategies.base import OptimizerArg, StepSettings, Strategy, StrategyOptions

if TYPE_CHECKING:
    from trainkit.config import Config

# trainer.precision -> Accelerate's mixed_precision.
PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# What ``accelerate launch --use_fsdp`` / ``--use_deepspeed`` leave in each worker's environment.
PLUGIN_ENV = {"fsdp": "ACCELERATE_USE_FSDP", "deepspeed": "ACCELERATE_USE_DEEPSPEED"}


def _env_plugin() -> str:
    return next((p for p, var in PLUGIN_ENV.items() if os.environ.get(var, "").lower() == "true"), "none")


def _refuse_on_cpu(plugin: str) -> None:
    raise ConfigError(
        f"strategy=accelerate with Accelerate's {plugin} plugin needs GPUs (on CPU it would silently "
        f"{'become DDP' if plugin == 'fsdp' else 'train each rank alone'}); "
        f"use strategy.plugin=none, or strategy={plugin} (trainkit's own, runs on CPU)"
    )


@dataclass
class AccelerateOptions(StrategyOptions):
    name: str = "accelerate"
    # none: Accelerate's DDP over the launched processes. fsdp: its FSDP2 plugin (GPUs only).
    # deepspeed is refused: strategy=deepspeed is trainkit's ZeRO with its own checkpoints.
    plugin: Literal["none", "fsdp", "deepspeed"] = "none"

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        plugin = self.plugin if self.plugin != "none" else _env_plugin()
        if plugin == "deepspeed":
            raise ConfigError(
                "strategy=accelerate does not run Accelerate's DeepSpeed plugin (its engine keeps its own "
                "checkpoints); use strategy=deepspeed for ZeRO with trainkit's checkpoints"
            )
        gpus = getattr(cfg.launcher, "gpus_per_worker", 0)
        if plugin != "none" and not gpus and not torch.cuda.is_available():
            _refuse_on_cpu(plugin)


class AccelerateStrategy(Strategy):
    Options = AccelerateOptions
    options: AccelerateOptions

    def __init__(self, options: AccelerateOptions, dist: DistInfo, settings: StepSettings) -> None:
        super().__init__(options, dist, settings)
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        plugin = options.plugin if options.plugin != "none" else _env_plugin()
        cpu = dist.device.type == "cpu"
        if plugin != "none" and cpu:
            _refuse_on_cpu(plugin)
        fsdp = None
        if plugin == "fsdp":
            from accelerate import FullyShardedDataParallelPlugin

            fsdp = FullyShardedDataParallelPlugin(fsdp_version=2)
        # Accelerate sets the intra-op threads itself when OMP_NUM_THREADS is unset; trainkit
        # already chose them (trainer.threads).
        threads = torch.get_num_threads()
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision=PRECISION[settings.precision],
            gradient_accumulation_steps=settings.grad_accum, fsdp_plugin=fsdp,
        )
        torch.set_num_threads(threads)
        # Loss scaling is the Accelerator's (it owns the GradScaler for fp16).
        self.scaler = None
        acc = self.accelerator
        if acc.num_processes != dist.world_size or acc.process_index != dist.rank:
            raise TrainkitError(
                f"Accelerate sees process {acc.process_index} of {acc.num_processes}, trainkit's group has "
                f"rank {dist.rank} of {dist.world_size}: the launcher's environment is not Accelerate's"
            )
        want = DistributedType.FSDP if fsdp is not None else (
            DistributedType.MULTI_CPU if cpu else DistributedType.MULTI_GPU)
        if dist.world_size > 1 and acc.distributed_type != want:
            raise TrainkitError(f"Accelerate chose {acc.distributed_type.value}, expected {want.value}")
        if dist.is_main:
            # What Accelerate itself reports, so a log shows it took the launched processes.
            print(f"accelerate: {acc.num_processes} processes ({acc.distributed_type.value}), "
                  f"mixed precision {acc.mixed_precision}", flush=True)

    def setup(self, model: nn.Module, optimizer: OptimizerArg, units: list[nn.Module] | None = None
              ) -> tuple[nn.Module, torch.optim.Optimizer]:
        from trainkit.strategies.base import checkpoint_activations, default_units

        model = model.to(self.dist.device)
        if self.settings.activation_checkpointing:
            checkpoint_activations(default_units(model) if units is None else units)
        if self.settings.compile:
            model.compile()
        if not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(list(model.parameters()))
        model, opt = self.accelerator.prepare(model, optimizer)
        self.model = model
        return model, opt

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.accelerator.autocast()

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        assert self.model is not None
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        with self.no_sync(sync):
            self.accelerator.backward(loss)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> torch.Tensor | float | None:
        norm = None
        if self.settings.grad_clip > 0:
            assert self.model is not None
            total = self.accelerator.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
            norm = total.full_tensor() if hasattr(total, "full_tensor") else total
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The unwrapped torch optimizer (DCP reads its state), and Accelerate's loss scaler."""
        from trainkit.checkpoint import ModelOptimState

        state: dict[str, Any] = {"model_optim": ModelOptimState(model, _inner(optimizer))}
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler
        return state

    def torch_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return _inner(optimizer)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)
