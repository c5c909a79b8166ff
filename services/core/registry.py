"""Name -> implementation tables (algorithms, advantage estimators, policy losses, scorer
kinds): each registers itself with a decorator, and a lookup of an unknown name is a
``UserError`` that names the setting and lists what is registered."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

from services.core.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """``what`` names the entries in messages ("advantage estimator"); ``setting`` is the
    config field that picks one ("algorithm.name")."""

    def __init__(self, what: str, setting: str, package: str | None = None, modules: tuple[str, ...] = ()):
        """``package``: a package whose modules register entries when imported; they are
        imported on the first lookup, so a new entry is one new module and nothing else.
        ``modules``: more modules imported on the first lookup (entries defined next to the
        registry's own module, which cannot import them without a cycle)."""
        self.what, self.setting, self.package, self.modules = what, setting, package, modules
        self._entries: dict[str, T] = {}
        self._discovered = package is None and not modules

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        names = list(self.modules)
        if self.package is not None:
            package = importlib.import_module(self.package)
            names += [f"{self.package}.{module.name}" for module in pkgutil.iter_modules(package.__path__)]
        for name in names:
            importlib.import_module(name)

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.what} '{name}' is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def get(self, name: str, setting: str | None = None) -> T:
        """``setting``: the field to name in the error when it is more precise than the
        registry's own (``reward.scorers.2.kind`` rather than ``reward.scorers[].kind``)."""
        if name not in self._entries:
            self._discover()
        if name not in self._entries:
            raise UserError(
                f"{setting or self.setting}: unknown {self.what} '{name}'; registered: {', '.join(self.names())}"
            )
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.names()


# RL algorithms (``services/algorithms/*.py``): here, below the config, so that the config
# can check ``algorithm.name`` against what is registered
ALGORITHMS: Registry = Registry("RL algorithm", "algorithm.name", package="services.algorithms")
