"""Strategies by name: ``strategy=single|ddp|fsdp|deepspeed`` (or ``pkg.module:Class``)."""

from __future__ import annotations

from trainkit.registry import Registry
from trainkit.strategies.base import Strategy

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
STRATEGIES.register("single")(Strategy)


def _lazy(name: str, module: str, attr: str) -> None:
    """Registers a strategy whose module is only imported when picked (DeepSpeed is heavy)."""

    def load(*args, **kwargs):  # type: ignore[no-untyped-def]
        import importlib

        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    STRATEGIES.register(name)(load)  # type: ignore[arg-type]


_lazy("ddp", "trainkit.strategies.ddp", "DDPStrategy")
_lazy("fsdp", "trainkit.strategies.fsdp", "FSDPStrategy")
_lazy("deepspeed", "trainkit.strategies.deepspeed", "DeepSpeedStrategy")

__all__ = ["STRATEGIES", "Strategy"]
