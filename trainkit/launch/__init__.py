"""Launchers by name: where the workers run (``launcher=local|ray``)."""

from __future__ import annotations

from collections.abc import Callable

from trainkit.config import Config
from trainkit.registry import Registry

LAUNCHERS: Registry[Callable[[Config], int]] = Registry("launcher")


@LAUNCHERS.register("local")
def _local(cfg: Config) -> int:
    from trainkit.launch.local import launch

    return launch(cfg)


@LAUNCHERS.register("ray")
def _ray(cfg: Config) -> int:
    from trainkit.launch.ray_launcher import launch

    return launch(cfg)
