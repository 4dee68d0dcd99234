"""Name -> factory registries, and the auto-import that fills them.

Each layer owns its registry: `sdesbench.data.DATASETS`, `sdesbench.models.MODELS`,
`sdesbench.methods.METHODS` (defined in the package's `base.py`, re-exported by the package).
A new dataset, model or method is one file in its package that decorates its class or factory
with `@MODELS.register("name")`; the package's `__init__` imports every module of the package
(`import_submodules`), so no central list needs editing and importing the package is enough to
see every entry.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Iterator

from sdesbench.errors import ConfigError


class Registry:
    def __init__(self, kind: str, names_entries: bool = False):
        self.kind = kind
        self.names_entries = names_entries  # register sets the class's `name` (written once, in the decorator)
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._entries and self._entries[name] is not obj:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            if self.names_entries:
                obj.name = name
            self._entries[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; "
                              f"known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def did_you_mean(name: str, choices, prefix: str = "") -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def import_submodules(package: str, path: list[str]) -> None:
    """Import every module of a package (called from its `__init__` with `__name__, __path__`)."""
    for mod in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{mod.name}")
