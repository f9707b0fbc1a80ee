"""Name → component registries, so a spec can pick a component by name.

Adding a student, loss, teacher runtime or dataset reader is one decorated
function in one file::

    STUDENTS = Registry[StudentBuilder]("student architecture")

    @STUDENTS.register("mlp")
    def build_mlp(...): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from worker.engine.errors import SpecInvalid

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of components of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` (names are unique)."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str, *, field: str | None = None) -> T:
        """The component named ``name``; a :class:`SpecInvalid` listing the known names if none."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise SpecInvalid(
                f"unknown {self.kind} {name!r}; known: {known}", field=field
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())
