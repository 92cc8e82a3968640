"""A tiny named registry with "did you mean" errors, used by every plug-in point."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise a ``KeyError`` that suggests close matches.

    >>> r: Registry[int] = Registry("colour")
    >>> _ = r.register("red")(1)
    >>> r["red"]
    1
    >>> r["rde"]
    Traceback (most recent call last):
    ...
    KeyError: "Unknown colour 'rde'. Did you mean: red? Known: red"
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._frozen = False

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if self._frozen:
                raise RuntimeError(f"{self.kind} registry is frozen; cannot add {name!r}")
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def freeze(self) -> None:
        self._frozen = True

    def __getitem__(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise KeyError(f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._items.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)
