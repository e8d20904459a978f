"""Search spaces: what a sweep file's ``space:`` and the command line's Hydra grammar say, as
plain :class:`Param` values (no Ray here, so a sweep validates before Ray is imported).

In a sweep file (``recipes/sweep/*.yaml``)::

    space:
      optim.lr: {loguniform: [1.0e-4, 0.3]}
      optim.weight_decay: {uniform: [0.0, 0.1]}
      model.width: {choice: [8, 16]}
      data.batch_size: {grid: [16, 32]}

On the command line, Hydra's own sweep grammar (parsed by its public override parser):
``a,b`` and ``choice(a,b)`` and ``range(1,4)`` are choices (every value once under
``search=grid``), ``interval(lo,hi)`` is uniform, ``tag(log,interval(lo,hi))`` log-uniform,
and ``tag(grid,choice(a,b))`` a grid axis under any search.

Choice and grid values are kept as the override text a trial gets (``[1,1]``, ``0.1``), so
every search algorithm sees simple categories and the table shows what was typed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from trainkit.errors import ConfigError

Kind = Literal["choice", "grid", "uniform", "loguniform"]
KINDS: tuple[str, ...] = ("choice", "grid", "uniform", "loguniform")


@dataclass(frozen=True)
class Param:
    """One swept key: ``values`` for choice/grid (override text), ``low``/``high`` for ranges."""

    key: str
    kind: Kind
    values: tuple[str, ...] = ()
    low: float = 0.0
    high: float = 0.0

    @property
    def finite(self) -> bool:
        return self.kind in ("choice", "grid")

    def probes(self) -> list[str]:
        """Values that show a bad key or range before any trial starts: every category, both ends."""
        return list(self.values) if self.finite else [render(self.low), render(self.high)]


def render(value: Any) -> str:
    """A value as override text: numbers at full precision, lists and mappings as Hydra reads them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    return "null" if value is None else str(value)


def short(value: Any) -> str:
    """A value as the table and the trial directory show it (floats to 4 significant digits)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def from_yaml(space: dict[str, Any]) -> list[Param]:
    """The ``space:`` mapping of a sweep file: ``key: {kind: [values]}`` with one kind each."""
    params = []
    for key, spec in space.items():
        where = f"sweep.space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where} must be one of {{{': [...], '.join(KINDS)}: [...]}}, got {spec!r}")
        ((kind, args),) = spec.items()
        if kind not in KINDS:
            raise ConfigError(f"{where}: {kind!r} is unknown; valid: {', '.join(KINDS)}")
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"{where}.{kind} must be a non-empty list, got {args!r}")
        if kind in ("choice", "grid"):
            params.append(Param(key, kind, tuple(render(v) for v in args)))
        else:
            params.append(_range(key, kind, args, where))
    return params


def _range(key: str, kind: str, args: Any, where: str) -> Param:
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError(f"{where}.{kind} must be [low, high] numbers, got {args!r}")
    low, high = float(args[0]), float(args[1])
    if not low < high:
        raise ConfigError(f"{where}.{kind}: low {low:g} must be below high {high:g}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: low {low:g} must be > 0")
    return Param(key, kind, low=low, high=high)  # type: ignore[arg-type]


def from_overrides(overrides: list[str]) -> tuple[list[str], list[Param]]:
    """Splits command-line overrides into fixed ones and swept keys (Hydra's grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep, ValueType
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    except HydraException as exc:
        raise ConfigError(f"sweep: {str(exc).strip().splitlines()[0]}") from exc
    fixed, params = [], []
    for o in parsed:
        if not o.is_sweep_override():
            fixed.append(o.input_line)
            continue
        key = o.get_key_element()
        if key.startswith(("+", "~")):
            raise ConfigError(f"{o.input_line}: a swept key is set, not added or deleted; drop the {key[0]}")
        value = o.value()
        tags = set(getattr(value, "tags", set()) or ())
        if o.value_type == ValueType.GLOB_CHOICE_SWEEP:
            raise ConfigError(f"{o.input_line}: glob() is not supported in a sweep; list the choices (a,b)")
        if isinstance(value, IntervalSweep):
            kind = "loguniform" if "log" in tags else "uniform"
            params.append(_range(key, kind, [value.start, value.end], key))
        else:
            values = tuple(o.sweep_string_iterator())
            params.append(Param(key, "grid" if "grid" in tags else "choice", values))
    return fixed, params

