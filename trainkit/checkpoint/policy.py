"""When to checkpoint: every N steps and/or every T seconds (clock injectable for tests)."""

from __future__ import annotations

import time
from collections.abc import Callable

from trainkit import distributed


class SavePolicy:
    """``due(step)`` is True every ``every_steps`` steps or once ``every_seconds`` have passed
    since the last save (or since construction). A True answer counts as a save: the timer
    restarts. ``0`` disables either trigger.

    Ranks must agree: clocks drift, so either use rank 0's answer (broadcast it) or call
    :meth:`agreed`, which all-reduces (MAX) every rank's answer so all save together.
    """

    def __init__(self, every_steps: int = 0, every_seconds: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every_steps < 0 or every_seconds < 0:
            raise ValueError("every_steps and every_seconds must be >= 0")
        self.every_steps = int(every_steps)
        self.every_seconds = float(every_seconds)
        self.clock = clock
        self._last_time = clock()
        self._last_step: int | None = None

    def _check(self, step: int) -> bool:
        if self._last_step is not None and step == self._last_step:
            return False
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_seconds) and self.clock() - self._last_time >= self.every_seconds

    def mark_saved(self, step: int) -> None:
        self._last_step = step
        self._last_time = self.clock()

    def due(self, step: int) -> bool:
        if self._check(step):
            self.mark_saved(step)
            return True
        return False

    def agreed(self, step: int, group=None) -> bool:
        """``due`` agreed across ``group`` (any rank due → all save); collective."""
        decision = bool(distributed.all_reduce_max(int(self._check(step)), group))
        if decision:
            self.mark_saved(step)
        return decision
