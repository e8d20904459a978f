"""FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over ranks.

Each repeated block is its own shard unit (all-gathered just before it runs), then the
root; bf16 is handled by FSDP's mixed-precision policy (bf16 compute and all-gather, fp32
reductions and master weights) rather than autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from trainkit.errors import ConfigError
from trainkit.strategies.base import Strategy, StrategyOptions

if TYPE_CHECKING:
    from trainkit.config import Config


@dataclass
class FSDPOptions(StrategyOptions):
    name: str = "fsdp"
    # Free each block's gathered parameters after its forward (memory) or keep them for the
    # backward (one all-gather fewer per block). The root always keeps its own: the backward
    # needs them first thing, so freeing them only buys a second all-gather every step.
    reshard_after_forward: bool = True

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        if cfg.trainer.precision == "fp16":
            raise ConfigError("trainer.precision=fp16 with strategy=fsdp is not supported; use bf16")


class FSDPStrategy(Strategy):
    Options = FSDPOptions
    options: FSDPOptions
    shards_meta = True

    def wrap(self, model: nn.Module, units: list[nn.Module]) -> nn.Module:
        policy = MixedPrecisionPolicy()
        if self.precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        reshard = self.options.reshard_after_forward
        for unit in units:
            fully_shard(unit, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mp_policy=policy, reshard_after_forward=False)
        return model

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        assert isinstance(self.model, FSDPModule)
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
