"""Table specs (`experiments/<table>.yaml`) as typed values, validated like run configs.

A spec reads like the paper's table: groups (one per network) of rows (one per method), each row
with the paper's numbers (`miou`, `pa`). Method options are given per method name
(`options: {sdes: {tau: 5}}`) at the spec or group level, or per row (`options: {...}` inside the
row). Presets (`paper`, `mini`, `smoke`) hold the protocol, `base` the settings every preset
shares, a group's `config:` (e.g. `{model: {pretrained: false}}`) applies to its rows. A row names
its teacher with `teacher: true` (another trained copy of the row's own network: the table's
Student row of the same seed, shared by configuration hash) or `teacher: <model name>`.
A sweep spec (fig3) has `sweeps` (one per hyper-parameter) instead of groups.

Loading checks every key and type (the same `from_dict` as the run config, the same one-line
errors naming the file and key), every preset's protocol as a run configuration, and every name
(model, method, dataset) against the registries.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdesbench.config import RunConfig, from_dict, load_yaml, merge, method_section, parse_config
from sdesbench.data import DATASETS
from sdesbench.errors import ConfigError
from sdesbench.methods import METHODS
from sdesbench.models import MODELS

PRESETS = ("paper", "mini", "smoke")
Metric = Literal["miou", "pa"]


@dataclass
class Row:
    label: str
    method: str = "student"
    miou: float | None = None  # the paper's numbers
    pa: float | None = None
    metric: Literal["student", "ens_t"] = "student"  # which evaluated prediction the row reports
    teacher: bool | str = False
    options: dict[str, Any] = field(default_factory=dict)
    show: dict[str, Any] = field(default_factory=dict)  # extra display columns of the paper's table
    params_m: float | None = None  # the paper's Params / FLOPs when the row's differ from its group's
    gflops: float | None = None

    def paper(self) -> dict[str, float]:
        return {m: v for m, v in (("miou", self.miou), ("pa", self.pa)) if v is not None}


@dataclass
class Group:
    name: str
    model: str
    rows: list[Row]
    config: dict[str, Any] = field(default_factory=dict)  # partial run config for this group's rows
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method name
    params_m: float | None = None
    gflops: float | None = None


@dataclass
class Preset:
    """A partial run configuration (`data`, `train`, ... sections) applied to every row of a table."""

    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v}


@dataclass
class Profile:
    num_classes: int
    input_hw: list[int] = field(default_factory=lambda: [512, 512])
    columns: list[Literal["params", "flops"]] = field(default_factory=lambda: ["params", "flops"])


@dataclass
class ParameterSweep:
    """One hyper-parameter of a sweep spec (Figure 3): the method option it sets and its values."""

    values: list[int | float]  # int first: `N: [2, 3]` stays integral (labels, options, hashes)
    option: str | None = None  # default: the parameter's own name
    domain: list[int | float | None] = field(default_factory=lambda: [None, None])
    best: int | float | list[int | float] | None = None  # the paper's choice, marked on the plot
    log: bool = False
    integer: bool = False
    label: str | None = None


@dataclass
class Spec:
    name: str
    title: str
    presets: dict[str, Preset]
    dataset: str | None = None
    metrics: list[Metric] = field(default_factory=lambda: ["miou"])
    layout: Literal["long", "wide"] = "long"
    profile: Profile | None = None
    cost: bool = True
    base: dict[str, Any] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method name
    groups: list[Group] = field(default_factory=list)
    method: str | None = None  # sweep specs: the swept method and network
    model: str | None = None
    sweeps: dict[str, ParameterSweep] = field(default_factory=dict)

    @property
    def is_sweep(self) -> bool:
        return bool(self.sweeps) and not self.groups

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise ConfigError(f"table {self.name!r} has no preset {name!r}; it has: {', '.join(self.presets)}")
        return self.presets[name]

    def preset_settings(self, name: str) -> dict[str, Any]:
        """`base` merged with the preset's sections: the protocol shared by every run of the preset."""
        return merge(dict(self.base), self.preset(name).settings())

    def method_options(self, method: str, group: Group | None = None) -> dict[str, Any]:
        opts = dict(self.options.get(method, {}))
        return merge(opts, group.options.get(method, {})) if group else opts

    def sweep(self, param: str) -> ParameterSweep:
        if param not in self.sweeps:
            raise ConfigError(f"unknown sweep parameter {param!r}; choose {', '.join(self.sweeps)}")
        return self.sweeps[param]


def experiments_dir() -> Path:
    """`experiments/` of the checkout (or $SDESBENCH_EXPERIMENTS)."""
    env = os.environ.get("SDESBENCH_EXPERIMENTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "experiments"


def list_tables() -> list[str]:
    return sorted(p.stem for p in experiments_dir().glob("*.yaml"))


def load_spec(table: str) -> Spec:
    path = experiments_dir() / f"{table}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown table {table!r}; known: {', '.join(list_tables())}")
    data = load_yaml(path)
    if "presets" not in data:
        raise ConfigError(f"{path}: a table spec needs a mapping with 'presets'")
    data.setdefault("name", table)
    data.setdefault("title", table)
    try:
        spec = from_dict(Spec, data)
        check_spec(spec)
    except ConfigError as e:
        raise ConfigError(f"{path.name}: {e}") from None
    return spec


def check_spec(spec: Spec) -> None:
    """Every preset is a valid run configuration, every name is registered (with a did-you-mean)."""
    for name in spec.presets:
        settings = spec.preset_settings(name)
        if "method" in settings:
            settings["method"] = method_section(settings["method"])
        _check_partial(settings, f"presets.{name}")
    for group in spec.groups:  # an unknown name is an error (with a did-you-mean), never "not implemented yet"
        _check_partial(group.config, f"group {group.name!r} config")
        MODELS.get(group.model)
        for row in group.rows:
            METHODS.get(row.method)
            if isinstance(row.teacher, str):
                MODELS.get(row.teacher)
    for method in spec.options:
        METHODS.get(method)
    if spec.method:
        METHODS.get(spec.method)
    if spec.model:
        MODELS.get(spec.model)
    if spec.dataset and spec.dataset not in DATASETS:
        DATASETS.get(spec.dataset)


def _check_partial(settings: dict[str, Any], where: str) -> RunConfig:
    try:
        return parse_config(settings)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
