"""Plugins: methods, models, datasets and training hooks from outside the package, registered with the decorators the
built-ins use (`@METHODS.register("my_kd")`), without forking sdesbench.

A plugin is a Python file (`my_kd.py`) or an importable module (`my_pkg.kd`). It is loaded (imported)
in one of four ways: `sdesbench --plugin SOURCE ...` (repeatable, before the command), the
`SDESBENCH_PLUGINS` variable (sources separated by `:`), `plugins: [...]` in a run configuration or a
table spec (a relative path is relative to that file), or the entry-point group `sdesbench.plugins` of an
installed package. The first, second and fourth happen when the command line starts (`load_startup_plugins`).

Loading is idempotent: a source already loaded (the same resolved file, or the same module) is not
imported again. While a plugin is imported, whatever it registers is recorded with the plugin as its
origin (`registry.py`), so a name that another plugin or a built-in already holds is refused with both
origins named, and a plugin that registers nothing is refused too. Every failure is one `PluginError`
line naming the plugin: a missing file or module, a syntax error (file and line), an exception raised
while importing (the plugin's own last frame, file:line, and the message), a clash, a method whose
`Options` is not a dataclass or whose options collide. What a failed plugin had registered is removed.

Each loaded plugin has the sha256 of its source (the file; for a package, every `.py` file under it):
a run whose model, dataset or method comes from a plugin carries that hash in its key
(`RunConfig.plugin_sha256`, filled by `engine.configure.validate`), so a record made with other plugin
source is stale, as one made under another default is.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from sdesbench.errors import ConfigError, SdesbenchError
from sdesbench.registry import loading_plugin, registered_by, unregister_origin

ENTRY_POINT_GROUP = "sdesbench.plugins"
ENV_VAR = "SDESBENCH_PLUGINS"


class PluginError(ConfigError):
    """A plugin that cannot be loaded (one line, naming it)."""


@dataclass(frozen=True)
class Plugin:
    source: str  # as it was given (`my_kd.py`, `../plugins/my_kd.py`, `my_pkg.kd`)
    target: str  # the resolved file (absolute path) or the module name: its origin in the registries
    label: str  # the file's name or the module's: how a run's key names it (machine-independent)
    sha256: str  # of the source file, or of every .py file of a package (relative path and bytes)
    is_file: bool
    module: str  # the name it is imported under (a file's: sdesbench_plugin_<stem>_<hash of its path>)

    def describe(self) -> str:
        return f"{self.target} (sha256 {self.sha256[:12]})"


_LOADED: dict[str, Plugin] = {}  # by target


def is_path_source(source: str) -> bool:
    """A file (`my_kd.py`, `plugins/my_kd.py`) rather than a module name (`my_pkg.kd`)."""
    return source.endswith(".py") or "/" in source or os.sep in source


def loaded_plugins() -> list[Plugin]:
    return list(_LOADED.values())


def plugin_of(origin: str | None) -> Plugin | None:
    """The loaded plugin a registry origin names (None for a built-in or another origin)."""
    return _LOADED.get(origin) if origin else None


def load_plugins(sources: Iterable[str], relative_to: str | Path | None = None) -> list[Plugin]:
    """Import each source (a .py path, relative to `relative_to` or the current folder, or a module name)
    once; the plugins in the order given. One `PluginError` line for the first that fails."""
    return [load_plugin(str(s), relative_to) for s in sources if str(s).strip()]


def load_plugin(source: str, relative_to: str | Path | None = None) -> Plugin:
    source = source.strip()
    if is_path_source(source):
        path = Path(source).expanduser()
        if not path.is_absolute():
            path = Path(relative_to or ".") / path
        path = path.resolve()
        if str(path) in _LOADED:
            return _LOADED[str(path)]
        if not path.is_file():
            raise PluginError(f"plugin {source}: file not found ({path})")
        try:
            sha = sha256_of([(path.name, path)])
        except OSError as e:
            raise PluginError(f"plugin {source}: unreadable ({e.strerror or type(e).__name__})") from None
        module_name = f"sdesbench_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{sha256_text(str(path))[:8]}"
        plugin = Plugin(source, str(path), path.name, sha, True, module_name)
        spec = importlib.util.spec_from_file_location(module_name, path)
        _import(plugin, lambda: _exec_file(spec, module_name), [str(path)])
        return plugin
    if source in _LOADED:
        return _LOADED[source]
    try:
        spec = importlib.util.find_spec(source)
    except (ImportError, ValueError) as e:  # a parent package that is missing or fails to import
        raise PluginError(f"plugin {source}: {one_line(e)}") from None
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        raise PluginError(f"plugin {source}: no module named {source!r} (a file needs its path, e.g. ./{source}.py)")
    files = module_files(spec)
    plugin = Plugin(source, source, source, sha256_of(files), False, source)
    roots = [str(Path(d)) for d in (spec.submodule_search_locations or [])] or [str(Path(spec.origin))]
    _import(plugin, lambda: importlib.import_module(source), roots)
    return plugin


def unload(plugin: Plugin) -> None:
    """Forget a loaded plugin: what it registered and its module (a test, or a tool loading plugins for a
    while); loading it again imports it again."""
    unregister_origin(plugin.target)
    _LOADED.pop(plugin.target, None)
    for name in [m for m in sys.modules if m == plugin.module or m.startswith(plugin.module + ".")]:
        del sys.modules[name]


def _exec_file(spec, module_name: str) -> None:
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look a class's module up here
    spec.loader.exec_module(module)


def _import(plugin: Plugin, do_import, own_files: list[str]) -> None:
    """Import a plugin with its registrations recorded under its origin; one line on failure, with what it
    had registered and its module forgotten."""
    try:
        with loading_plugin(plugin.target):
            do_import()
    except BaseException as e:
        unload(plugin)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise PluginError(f"plugin {plugin.source}: {import_failure(e, own_files)}") from None
    if not registered_by(plugin.target):
        unload(plugin)
        raise PluginError(f"plugin {plugin.source} registers nothing: it must register a method, model, dataset or hook "
                          "(e.g. @METHODS.register(\"my_kd\") from sdesbench.methods)")
    _LOADED[plugin.target] = plugin


def import_failure(e: BaseException, own_files: list[str]) -> str:
    """What went wrong importing a plugin, in one line: a syntax error's file and line, an error of the
    suite as it is (a clash, bad Options), any other exception with the plugin's own last frame."""
    if isinstance(e, SyntaxError):
        return f"syntax error at {e.filename}:{e.lineno}: {e.msg}"
    if isinstance(e, SdesbenchError):
        return one_line(e)
    if isinstance(e, SystemExit):
        return f"exited while being imported (SystemExit {e.code})"
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if any(f.filename == p or f.filename.startswith(p.rstrip(os.sep) + os.sep)
                                    for p in own_files)]
    where = f" (at {own[-1].filename}:{own[-1].lineno})" if own else ""
    message = one_line(e)
    return f"{type(e).__name__}{': ' + message if message else ''}{where}"


def one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else ""


def module_files(spec) -> list[tuple[str, Path]]:
    """The source files of a module: its file, or every .py file under a package's folders."""
    if spec.submodule_search_locations:
        files = []
        for root in spec.submodule_search_locations:
            files += [(str(p.relative_to(root)), p) for p in sorted(Path(root).rglob("*.py"))]
        return files
    return [(Path(spec.origin).name, Path(spec.origin))]


def sha256_of(files: list[tuple[str, Path]]) -> str:
    """sha256 of one file's bytes; of several, over (relative name, bytes) pairs in the given order."""
    if len(files) == 1:
        return hashlib.sha256(files[0][1].read_bytes()).hexdigest()
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def env_sources(value: str | None = None) -> list[str]:
    """The sources of `SDESBENCH_PLUGINS` (separated by `:`)."""
    value = os.environ.get(ENV_VAR, "") if value is None else value
    return [s for s in value.split(":") if s.strip()]


def load_entry_points() -> list[Plugin]:
    """The plugins installed packages declare in the entry-point group `sdesbench.plugins`
    (`my_kd = "my_pkg.kd"`): each names a module, which is loaded like `--plugin my_pkg.kd`."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded.append(load_plugin(ep.module))
    return loaded


def load_startup_plugins(cli_sources: Iterable[str] = ()) -> list[Plugin]:
    """What the command line loads before any command: installed entry points, `SDESBENCH_PLUGINS`,
    then each `--plugin`, in that order."""
    return load_entry_points() + load_plugins(env_sources()) + load_plugins(cli_sources)
