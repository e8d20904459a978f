"""Name → object registries, for everything a user picks by name in a config."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from trainkit.errors import ConfigError

T = TypeVar("T")


def import_path(path: str, key: str) -> Any:
    """The object at ``package.module:attr``; a ConfigError naming ``key`` when it cannot be had."""
    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{key}={path}: cannot import ({exc})") from exc
    return obj


class Registry(Generic[T]):
    """A named table whose misses name the valid choices.

    Entries are objects, or import paths resolved on first use (so naming a heavy built-in,
    such as the DeepSpeed strategy, costs nothing until it is picked). Names containing
    ``:`` are import paths too (``package.module:attr``): users plug in their own entries
    without registering them, and they are looked up exactly like the built-ins.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T | str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            self._add(name, obj)
            return obj

        return add

    def add_path(self, name: str, path: str) -> None:
        """Registers ``package.module:attr``, imported when ``name`` is first picked."""
        self._add(name, path)

    def _add(self, name: str, obj: T | str) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj

    def get(self, name: str, key: str | None = None) -> T:
        key = key or self.kind
        if name in self._items:
            item = self._items[name]
            if isinstance(item, str):
                item = self._items[name] = import_path(item, key)
            return item  # type: ignore[return-value]
        if ":" in name:
            return import_path(name, key)  # type: ignore[no-any-return]
        raise ConfigError(f"{key}={name!r} is unknown; valid: {', '.join(sorted(self._items))}")

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
