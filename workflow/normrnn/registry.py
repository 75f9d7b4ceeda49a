"""Name -> implementation registries with errors that list the valid names."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __init__(self, kind: str, name: object, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, valid
        super().__init__(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return self.args[0]


class Registry(dict):
    """A dict from registry name to implementation.

    ``REG[name]`` raises :class:`UnknownNameError` listing the valid names, and
    ``@REG.register("name")`` adds a class or function.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def __missing__(self, name):
        raise UnknownNameError(self.kind, name, sorted(self))

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        if obj is not None:
            self._add(name, obj)
            return obj

        def deco(o: T) -> T:
            self._add(name, o)
            return o

        return deco

    def _add(self, name: str, obj) -> None:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self[name] = obj
