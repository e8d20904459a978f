"""Name → object registries, for everything a user picks by name in a config."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from trainkit.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table whose misses name the valid choices.

    Names containing ``:`` are import paths (``package.module:attr``) so users can plug in
    their own entries without registering them first.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str, key: str | None = None) -> T:
        if name in self._items:
            return self._items[name]
        if ":" in name:
            module, _, attr = name.partition(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise ConfigError(f"{key or self.kind}={name}: cannot import ({exc})") from exc
        raise ConfigError(
            f"{key or self.kind}={name!r} is unknown; valid: {', '.join(sorted(self._items))}"
        )

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
