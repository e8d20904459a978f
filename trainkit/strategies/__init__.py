"""Strategies by name: ``strategy=auto|single|ddp|fsdp|deepspeed|accelerate`` (or ``pkg.module:Class``).

The table of names is :data:`trainkit.components.STRATEGIES`; a strategy is a
:class:`Strategy` subclass with its options as ``Options``.
"""

from __future__ import annotations

from trainkit.components import STRATEGIES
from trainkit.strategies.base import StepSettings, Strategy, StrategyOptions

__all__ = ["STRATEGIES", "StepSettings", "Strategy", "StrategyOptions"]
