"""The search algorithms and trial schedulers a sweep picks by name (``sweep.search``,
``sweep.scheduler``; named in :mod:`trainkit.components`), each with its own options.

A search algorithm turns the :class:`~trainkit.launch.tune.space.Param` list into Tune's
``param_space`` and a ``search_alg``; a scheduler becomes Tune's ``scheduler``. Ray is
imported only when they are built, so every sweep file validates without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainkit.errors import ConfigError
from trainkit.launch.tune.space import Param
from trainkit.options import Options, positive


@dataclass
class SearchOptions(Options):
    """Options every search algorithm has; ``seed`` makes its sampling repeatable."""

    seed: int = 0

    def check_space(self, params: list[Param]) -> None:
        """Refuses a space this algorithm cannot search (ConfigError naming the key)."""


def param_space(params: list[Param], *, grid_choices: bool = False) -> dict[str, Any]:
    """Tune's ``param_space``: one entry per swept key (override key -> Tune domain)."""
    from ray import tune

    space: dict[str, Any] = {}
    for p in params:
        if p.kind == "grid" or (grid_choices and p.kind == "choice"):
            space[p.key] = tune.grid_search(list(p.values))
        elif p.kind == "choice":
            space[p.key] = tune.choice(list(p.values))
        elif p.kind == "uniform":
            space[p.key] = tune.uniform(p.low, p.high)
        else:
            space[p.key] = tune.loguniform(p.low, p.high)
    return space


class RandomSearch:
    """``search=random``: Tune's own sampler; grid axes are crossed with ``num_samples`` draws."""

    Options = SearchOptions
    # Tune's variant generator numbers trials from 0 (the experiment tag's prefix).
    first_index = 0

    def __init__(self, options: SearchOptions) -> None:
        self.options = options

    def build(self, params: list[Param]) -> tuple[dict[str, Any], Any]:
        from ray.tune.search import BasicVariantGenerator

        return param_space(params), BasicVariantGenerator(random_state=self.options.seed)


@dataclass
class GridOptions(SearchOptions):
    def check_space(self, params: list[Param]) -> None:
        ranges = [p.key for p in params if not p.finite]
        if ranges:
            raise ConfigError(f"sweep.search=grid needs a finite list for each key; {', '.join(ranges)} "
                              "is a range (use choice/grid values, or search=random|optuna)")


class GridSearch(RandomSearch):
    """``search=grid``: every combination of the choices (``num_samples`` repeats the grid)."""

    Options = GridOptions

    def build(self, params: list[Param]) -> tuple[dict[str, Any], Any]:
        from ray.tune.search import BasicVariantGenerator

        return param_space(params, grid_choices=True), BasicVariantGenerator(random_state=self.options.seed)


@dataclass
class OptunaOptions(SearchOptions):
    def check_space(self, params: list[Param]) -> None:
        grids = [p.key for p in params if p.kind == "grid"]
        if grids:
            raise ConfigError(f"sweep.search=optuna samples every key; {', '.join(grids)} is a grid axis "
                              "(use choice, or search=random)")


class OptunaSearch:
    """``search=optuna``: Tune's ``OptunaSearch`` (TPE by default), seeded."""

    Options = OptunaOptions
    # Tune's search generator numbers trials from 1 (the experiment tag's prefix).
    first_index = 1

    def __init__(self, options: OptunaOptions) -> None:
        self.options = options

    def build(self, params: list[Param]) -> tuple[dict[str, Any], Any]:
        try:
            from ray.tune.search.optuna import OptunaSearch as TuneOptuna
        except ImportError as exc:
            raise ConfigError(f"sweep.search=optuna needs optuna: pip install 'trainkit[tune]' ({exc})") from exc
        return param_space(params), TuneOptuna(seed=self.options.seed)


@dataclass
class SchedulerOptions(Options):
    """Options every trial scheduler has (none beyond its name)."""

    def check_steps(self, max_steps: int) -> None:
        """Range checks against the trials' ``trainer.max_steps``; raise ConfigError."""


class NoScheduler:
    """``scheduler=none``: every trial runs to its end (Tune's FIFO scheduler)."""

    Options = SchedulerOptions

    def __init__(self, options: SchedulerOptions) -> None:
        self.options = options

    def last_step(self, max_steps: int) -> int:
        """The step at which this scheduler ends every trial still running."""
        return max_steps

    def build(self, max_steps: int) -> Any:
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()


@dataclass
class ASHAOptions(SchedulerOptions):
    # Steps every trial runs before it can be stopped.
    grace_period: int = 1
    # Keep the best 1/reduction_factor of the trials at each rung.
    reduction_factor: float = 2.0
    # The last rung, in steps; 0: the trials' trainer.max_steps.
    max_t: int = 0
    brackets: int = 1

    def check_steps(self, max_steps: int) -> None:
        positive("sweep.scheduler.grace_period", self.grace_period)
        positive("sweep.scheduler.max_t", self.max_t, allow_zero=True)
        positive("sweep.scheduler.brackets", self.brackets)
        if self.reduction_factor <= 1:
            raise ConfigError(f"sweep.scheduler.reduction_factor={self.reduction_factor:g} must be > 1")
        if self.grace_period > (self.max_t or max_steps):
            raise ConfigError(f"sweep.scheduler.grace_period={self.grace_period} is past the last step "
                              f"({self.max_t or max_steps})")


class ASHA:
    """``scheduler=asha``: Tune's ``ASHAScheduler`` on trainkit's step counter.

    Time is the trial's ``step`` (not Tune's iteration count), so a trial that resumes
    from its checkpoint after a lost driver is judged at the same rungs.
    """

    Options = ASHAOptions

    def __init__(self, options: ASHAOptions) -> None:
        self.options = options

    def last_step(self, max_steps: int) -> int:
        return self.options.max_t or max_steps

    def build(self, max_steps: int) -> Any:
        from ray.tune.schedulers import ASHAScheduler

        o = self.options
        return ASHAScheduler(time_attr="step", max_t=o.max_t or max_steps, grace_period=o.grace_period,
                             reduction_factor=o.reduction_factor, brackets=o.brackets)
