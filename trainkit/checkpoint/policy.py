"""When to checkpoint: every N steps and/or every T seconds (clock injectable for tests)."""

from __future__ import annotations

import time
from collections.abc import Callable


class SavePolicy:
    """Every ``every_steps`` steps, or once ``every_seconds`` have passed since the last save
    (or since construction); ``0`` disables either trigger.

    The step trigger is the same on every rank. The time trigger is not (clocks drift), so a
    run asks it through the stop/save agreement (trainkit.preemption.StepAgreement), which
    makes every rank save at the same step when any rank's clock is due.
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

    def due_by_step(self, step: int) -> bool:
        return bool(self.every_steps) and step % self.every_steps == 0 and step != self._last_step

    def due_by_time(self) -> bool:
        return bool(self.every_seconds) and self.clock() - self._last_time >= self.every_seconds

    def mark_saved(self, step: int) -> None:
        self._last_step = step
        self._last_time = self.clock()

    def due(self, step: int) -> bool:
        """Either trigger, counted as a save (the timer restarts): for one process or a loop
        whose ranks share one answer."""
        if step != self._last_step and (self.due_by_step(step) or self.due_by_time()):
            self.mark_saved(step)
            return True
        return False
