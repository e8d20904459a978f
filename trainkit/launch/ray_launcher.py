"""Moved to :mod:`trainkit.launch.ray`; the names ``trainkit.bench`` imports stay until it imports them there."""

from trainkit.launch.ray.session import SPOT_SYSTEM_CONFIG, pin_loopback

__all__ = ["SPOT_SYSTEM_CONFIG", "pin_loopback"]
