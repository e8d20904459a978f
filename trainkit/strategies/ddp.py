"""torch DistributedDataParallel: every rank holds the whole model, gradients are all-reduced."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainkit.strategies.base import Strategy, StrategyOptions


@dataclass
class DDPOptions(StrategyOptions):
    name: str = "ddp"
    # Needed when some parameters get no gradient in a step (DDP would wait for them).
    find_unused_parameters: bool = False


class DDPStrategy(Strategy):
    Options = DDPOptions
    options: DDPOptions

    def wrap(self, model: nn.Module, units: list[nn.Module]) -> nn.Module:
        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=self.options.find_unused_parameters
        )

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        assert isinstance(self.model, DistributedDataParallel)
        return contextlib.nullcontext() if sync else self.model.no_sync()
