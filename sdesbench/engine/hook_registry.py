"""The hook registry (`HOOKS`, like the methods') and `train.hooks`: which hooks a run adds, with their options.

Every run has the built-in hooks (`BUILT_IN_HOOKS`, registered in engine/hooks.py: signals, the training
scalars, the loggers of `output.loggers`, progress, periodic evaluation, checkpoints). `train.hooks` adds others by their registered name, from the
package or from a plugin file (`@HOOKS.register("my_hook")`, docs/extending.md), each given as its name or as a
mapping of its name and options, validated against the hook's `Options` dataclass as a method's options are:

    train:
      hooks: [my_hook, {name: early_note, patience: 3}]

`resolve_hooks` checks the names (did-you-mean), refuses a built-in one (it runs anyway), a hook named twice
(its state in the checkpoint is kept by hook) and bad options, each in one line, and returns each entry with
its options resolved (`{"name": ..., <option>: <value>, ...}`, defaults filled in), which is what the run's
config.yaml records. `train.hooks` is not part of a run's key: a hook never changes the training step
(engine/state.py), so the same run with or without it trains the same weights.

This module holds only names and options; it imports no training code, so that `engine/configure.py` checks
`train.hooks` when it builds a config (the classes themselves: engine/hooks.py, `make_hooks`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from sdesbench.errors import ConfigError
from sdesbench.registry import Registry
from sdesbench.validate import describe, from_dict

# the hooks of every run (engine/hooks.py registers them), in the order they are built
BUILT_IN_HOOKS = ("signal", "log", "loggers", "progress", "periodic_evaluation", "checkpoint")
STAGES = ("before_train", "after_step", "after_final_evaluation", "after_train", "on_event", "state_dict",
          "load_state_dict")


def check_hook(name: str, obj: Any) -> None:
    """A registered hook is a class with the hook contract's methods (a `HookBase` subclass, engine/state.py), an
    integer `priority` and, when it takes options, an `Options` dataclass."""
    if not isinstance(obj, type) or not all(callable(getattr(obj, s, None)) for s in STAGES):
        raise ConfigError(f"hook {name!r}: register a subclass of sdesbench.engine.state.HookBase, got {obj!r}")
    if not isinstance(getattr(obj, "priority", None), int):
        raise ConfigError(f"hook {name!r}: its priority must be an integer (engine.state.Priority), "
                          f"got {getattr(obj, 'priority', None)!r}")
    options = getattr(obj, "Options", None)
    if options is not None and not dataclasses.is_dataclass(options):
        raise ConfigError(f"hook {name!r}: its Options must be a dataclass")


HOOKS = Registry("hook", names_entries=True, check=check_hook)


def hook_entry(entry: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(name, options) of one `train.hooks` entry: a name, or a mapping with `name` and the options."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        return entry["name"], {k: v for k, v in entry.items() if k != "name"}
    raise ConfigError(f"{where}: expected a hook's name or {{name: ..., <option>: ...}}, got {describe(entry)}")


def resolve_hooks(entries: list[Any]) -> list[dict[str, Any]]:
    """`train.hooks` checked and resolved (module docstring); one `ConfigError` line for the first problem."""
    resolved: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        name, options = hook_entry(entry, f"train.hooks[{i}]")
        if name in BUILT_IN_HOOKS:
            raise ConfigError(f"train.hooks: {name!r} is built in and runs in every run; train.hooks adds others")
        cls = HOOKS.get(name)
        if any(r["name"] == name for r in resolved):
            raise ConfigError(f"train.hooks names {name!r} twice")
        resolved.append({"name": name, **hook_options(cls, name, options)})
    return resolved


def hook_options(cls: Any, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The hook's options with its defaults filled in, as plain values; {} for a hook without `Options`."""
    if getattr(cls, "Options", None) is None:
        if options:
            raise ConfigError(f"train.hooks: hook {name!r} takes no options, got '{next(iter(options))}'")
        return {}
    return json.loads(json.dumps(dataclasses.asdict(from_dict(cls.Options, options, f"train.hooks.{name}"))))
