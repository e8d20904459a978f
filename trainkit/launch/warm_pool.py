"""Moved to :mod:`trainkit.launch.ray.warm_pool`; the names ``trainkit.bench`` imports stay until it imports them there."""

from trainkit.launch.ray.warm_pool import NAMESPACE, idle_processes

__all__ = ["NAMESPACE", "idle_processes"]
