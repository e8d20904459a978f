"""Typed options: the dataclass every component declares, and the builder that checks them.

A component (strategy, launcher, logger, the checkpointer, the data stream...) declares its
options as a dataclass deriving from :class:`Options`: the fields with their types
(``Literal`` for a fixed set of choices) and defaults, and a ``check(cfg)`` for ranges and
combinations. :func:`build` turns a plain (Hydra-composed) mapping into that dataclass,
rejecting unknown keys and ill-typed values with one line that names the key and what
would have been valid, so a plug-in's options are checked exactly like a built-in's.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from trainkit.errors import ConfigError

if TYPE_CHECKING:
    from trainkit.config import Config


@dataclass
class Options:
    """Base of every component's options; ``name`` picks the component in its registry."""

    name: str = ""

    def check(self, cfg: Config) -> None:
        """Range and combination checks that need the rest of the config; raise ConfigError."""


def choice(key: str, value: Any, valid: tuple[Any, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; valid: {', '.join(map(str, valid))}")


def positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def build(cls: type, data: Any, prefix: str) -> Any:
    """``cls(**data)`` with every key and value checked against ``cls``'s annotations."""
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        where = f" in {prefix}" if prefix else " here"
        raise ConfigError(f"unknown key {key!r}; valid keys{where}: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = coerce(hints[name], value, key)
    return cls(**values)


def coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is Literal:
        valid = typing.get_args(tp)
        choice(key, value, valid)
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return coerce(args[0], value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item,) = typing.get_args(tp)
        return [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if tp is Any:
        return value
    raise TypeError(f"config type {tp!r} of {key} is not supported")


def options_class(component: Any, base: type[Options], key: str) -> type[Options]:
    """The ``Options`` a component class declares; a plug-in without one gets the kind's base."""
    cls = getattr(component, "Options", base)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{key}: {component!r}.Options must be a dataclass deriving from {base.__qualname__}")
    return cls
