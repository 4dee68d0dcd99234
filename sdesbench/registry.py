"""Name -> factory registries, and the auto-import that fills them.

Each layer owns its registry: `sdesbench.data.DATASETS`, `sdesbench.models.MODELS`,
`sdesbench.methods.METHODS` (defined in the package's `base.py`, re-exported by the package).
A new dataset, model or method is one file in its package that decorates its class or factory
with `@MODELS.register("name")`; the package's `__init__` imports every module of the package
(`import_submodules`), so no central list needs editing and importing the package is enough to
see every entry.

A registry may also hold *families*: parametric names `family:argument` (the models'
`deeplabv3:timm/<name>`) resolved by a function registered with `register_family`, which checks the
argument and returns the entry. Every lookup (`get`, `in`) goes through the same resolution, so a
family name is accepted wherever a registered one is.

Each entry records its origin: `BUILT_IN` for the package's own modules, else the plugin being loaded
(`sdesbench/plugins.py`, which imports a plugin inside `loading_plugin`), else the registering object's
module. A name already held by another object is refused in one line naming both origins, and a registry
may check what is registered (`check`: the methods registry checks each method's `Options`).
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import pkgutil
from typing import Any, Callable, Iterator

from sdesbench.errors import ConfigError


BUILT_IN = "built-in"
REGISTRIES: list["Registry"] = []  # every registry made (data, models, methods): what a plugin may fill
_loading: list[str] = []  # the origin of the plugin being imported (innermost last)


@contextlib.contextmanager
def loading_plugin(origin: str) -> Iterator[None]:
    """What is registered inside this block (and not defined in the package itself) comes from `origin`."""
    _loading.append(origin)
    try:
        yield
    finally:
        _loading.pop()


def origin_of_object(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    if module == "sdesbench" or module.startswith("sdesbench."):
        return BUILT_IN
    return _loading[-1] if _loading else module or "unknown"


def registered_by(origin: str) -> list[tuple[str, str]]:
    """(kind, name) of every entry `origin` registered."""
    return [(r.kind, n) for r in REGISTRIES for n, o in r._origins.items() if o == origin and n in r._entries]


def unregister_origin(origin: str) -> None:
    """Remove what `origin` registered (a plugin that failed half-way)."""
    for r in REGISTRIES:
        for name in [n for n, o in r._origins.items() if o == origin]:
            r._entries.pop(name, None)
            r._origins.pop(name, None)


def describe_origin(origin: str) -> str:
    return "the built-in" if origin == BUILT_IN else f"plugin {origin}"


class Registry:
    def __init__(self, kind: str, names_entries: bool = False, check: Callable[[str, Any], None] | None = None):
        self.kind = kind
        self.names_entries = names_entries  # register sets the class's `name` (written once, in the decorator)
        self.check = check  # raises ConfigError (one line) for an entry that breaks the kind's contract
        self._entries: dict[str, Any] = {}
        self._families: dict[str, tuple[str, Callable[[str], Any]]] = {}  # family -> (pattern, resolver)
        self._origins: dict[str, str] = {}
        REGISTRIES.append(self)

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            origin = origin_of_object(obj)
            if name in self._entries and self._entries[name] is not obj:
                held = self._origins[name]
                raise ConfigError(f"{self.kind} {name!r} of {describe_origin(origin)} clashes with "
                                  f"{describe_origin(held)} {self.kind} {name!r}" if held != origin else
                                  f"{self.kind} {name!r} registered twice by {describe_origin(origin)}")
            if self.check is not None:
                self.check(name, obj)
            if self.names_entries:
                obj.name = name
            if name not in self._entries:
                self._origins[name] = origin
            self._entries[name] = obj
            return obj

        return deco

    def register_family(self, family: str, pattern: str) -> Callable[[Callable[[str], Any]], Callable[[str], Any]]:
        """Decorate `resolve(argument) -> entry` to serve the names `family:argument`; `pattern` shows the
        form in listings and errors (e.g. 'deeplabv3:timm/<name>'). `resolve` raises a one-line
        `ConfigError` for an argument it cannot serve; it should be cheap or cached, as every lookup calls it."""
        def deco(resolve: Callable[[str], Any]) -> Callable[[str], Any]:
            if family in self._families and self._families[family][1] is not resolve:
                raise RuntimeError(f"{self.kind} family {family!r} registered twice")
            self._families[family] = (pattern, resolve)
            return resolve

        return deco

    def origin(self, name: str) -> str:
        """Where an entry comes from: BUILT_IN, a plugin's file or module, or the registering module."""
        entry = self.get(name)
        return self._origins.get(name) or origin_of_object(entry)

    def get(self, name: str) -> Any:
        if name in self._entries:
            return self._entries[name]
        family, sep, argument = str(name).partition(":")
        if sep and family in self._families:
            return self._families[family][1](argument)
        raise ConfigError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; "
                          f"known: {', '.join([*sorted(self._entries), *self.patterns()])}")

    def names(self) -> list[str]:
        """The registered names (a family's names are open-ended: see `patterns`)."""
        return sorted(self._entries)

    def patterns(self) -> list[str]:
        """The forms of the family names, e.g. ['deeplabv3:timm/<name>']."""
        return [pattern for pattern, _ in self._families.values()]

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except ConfigError:
            return False
        return True

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
