"""A runnable configuration: the config's shape (sdesbench.config) plus what needs the registries.

`build_config` is what every caller uses (CLI, table specs, launchers, tests): it checks the shape,
then that the model, dataset, method, teacher and `train.hooks` exist and that the method's and the hooks'
options are valid for the dataset, each failure one `ConfigError` line, and it resolves those options (every
default filled in): the configuration it returns is the resolved one, and so is its `identity_hash`.
It lives in the engine layer because only a layer above data, models and methods may look names up
in their registries.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sdesbench.config import RunConfig, apply_overrides, method_section, parse_config
from sdesbench.identity import flatten
from sdesbench.data import DATASETS
from sdesbench.data.base import check_root_wanted
from sdesbench.engine.hook_registry import HOOKS, resolve_hooks
from sdesbench.errors import ConfigError
from sdesbench.methods import METHODS
from sdesbench.models import MODELS
from sdesbench.plugins import plugin_of


def validate(cfg: RunConfig) -> RunConfig:
    """Name lookups (with did-you-mean) and the method's own option checks. `method.options` is replaced
    by every option the method resolves (its defaults filled in), so that a run's configuration, record
    and key say what was trained, whatever the defaults are when they are read."""
    MODELS.get(cfg.model.name)
    dataset = DATASETS.get(cfg.data.name)
    check_root_wanted(dataset, cfg.data.root)  # a folder for a generated dataset would be silently ignored
    method_cls = METHODS.get(cfg.method.name)
    opts = method_cls.parse_options(cfg.method.options, num_classes=dataset.num_classes)
    cfg.method.options = json.loads(json.dumps(dataclasses.asdict(opts)))  # plain YAML/JSON values (no tuples)
    if method_cls.needs_teacher and not cfg.teacher.model:
        raise ConfigError(f"method {cfg.method.name!r} needs a teacher: set teacher.model (and teacher.checkpoint)")
    if cfg.teacher.model:
        MODELS.get(cfg.teacher.model)
    if method_cls.student_is_teacher and cfg.model.name != cfg.teacher.model:
        raise ConfigError(f"method {cfg.method.name!r} trains on the teacher itself: model.name must be teacher.model "
                          f"({cfg.teacher.model}), got {cfg.model.name}")
    cfg.train.hooks = resolve_hooks(cfg.train.hooks)
    record_plugins(cfg)
    return cfg


def record_plugins(cfg: RunConfig) -> None:
    """The plugins the run's model, dataset, method and teacher come from: their sources join `cfg.plugins`
    (so the run's config.yaml, a worker, a Slurm job load them however this process did: `--plugin`,
    `SDESBENCH_PLUGINS`, an entry point), and their source's sha256, by file or module name, becomes part of
    the run's key (`cfg.plugin_sha256`, empty for built-ins alone, which keeps their keys). A plugin's hook
    (`train.hooks`) joins `cfg.plugins` too, but never the key: a hook does not change the training."""
    used = [(MODELS, cfg.model.name), (DATASETS, cfg.data.name), (METHODS, cfg.method.name)]
    if cfg.teacher.model:
        used.append((MODELS, cfg.teacher.model))
    shas: dict[str, str] = {}
    for registry, name in used:
        plugin = plugin_of(registry.origin(name))
        if plugin is not None:
            shas[plugin.label] = plugin.sha256
            if plugin.target not in cfg.plugins:
                cfg.plugins.append(plugin.target)
    cfg.plugin_sha256 = shas
    for hook in cfg.train.hooks:  # a hook's plugin is loaded wherever the run trains, but it is not in the key
        plugin = plugin_of(HOOKS.origin(hook["name"]))
        if plugin is not None and plugin.target not in cfg.plugins:
            cfg.plugins.append(plugin.target)


# identity keys the planner sets itself (a teacher's checkpoint path), never part of what a run asks for (nor
# is a plugin's sha256, which `record_plugins` sets)
PLANNED_KEYS = ("teacher.checkpoint",)


def requested_keys(data: dict[str, Any] | None, overrides: list[str] | None) -> list[str]:
    """The identity keys a configuration mapping and `--set` values name (flattened, method options nested)."""
    d = {k: v for k, v in (data or {}).items() if k != "request"}
    if "method" in d:
        d["method"] = method_section(d["method"])
    return [k for k in flatten(apply_overrides(d, overrides)) if k not in PLANNED_KEYS
            and not k.startswith("plugin_sha256.")]


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None,
                 relative_to: str | Path | None = None) -> RunConfig:
    """Dict (from YAML / a spec) + `--set` overrides -> a validated RunConfig (method options resolved, its
    plugins loaded: relative paths from `relative_to`, the config file's folder).
    Its `request` records what was named (kept as it is when `data` is a stored run's configuration)."""
    cfg = validate(parse_config(data, overrides, relative_to))
    if not cfg.request:
        named = set(requested_keys(data, overrides))
        cfg.request = {k: v for k, v in flatten(cfg.identity()).items() if k in named}
    return cfg
