"""Tasks by name: what a recipe trains (model, data, loss), for the shared training function."""

from __future__ import annotations

from trainkit.registry import Registry
from trainkit.tasks.base import Task

TASKS: Registry[Task] = Registry("task")


def _register() -> None:
    from trainkit.tasks import gpt, resnet

    TASKS.register("resnet")(resnet.TASK)
    TASKS.register("gpt")(gpt.TASK)


_register()

__all__ = ["TASKS", "Task"]
