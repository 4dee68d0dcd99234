"""A runnable configuration: the config's shape (sdesbench.config) plus what needs the registries.

`build_config` is what every caller uses (CLI, table specs, launchers, tests): it checks the shape,
then that the model, dataset, method and teacher exist and that the method's options are valid
for the dataset, each failure one `ConfigError` line. It lives in the engine layer because only
a layer above data, models and methods may look names up in their registries.
"""
from __future__ import annotations

from typing import Any

from sdesbench.config import RunConfig, parse_config
from sdesbench.data import DATASETS
from sdesbench.errors import ConfigError
from sdesbench.methods import METHODS
from sdesbench.models import MODELS


def validate(cfg: RunConfig) -> RunConfig:
    """Name lookups (with did-you-mean) and the method's own option checks."""
    MODELS.get(cfg.model.name)
    dataset = DATASETS.get(cfg.data.name)
    method_cls = METHODS.get(cfg.method.name)
    method_cls.parse_options(cfg.method.options, num_classes=dataset.num_classes)
    if method_cls.needs_teacher and not cfg.teacher.model:
        raise ConfigError(f"method {cfg.method.name!r} needs a teacher: set teacher.model (and teacher.checkpoint)")
    if cfg.teacher.model:
        MODELS.get(cfg.teacher.model)
    return cfg


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Dict (from YAML / a spec) + `--set` overrides -> a validated RunConfig (method options too)."""
    return validate(parse_config(data, overrides))
