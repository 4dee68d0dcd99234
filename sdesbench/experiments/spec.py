"""Table specs as typed values, validated like run configs.

The paper's tables ship with the package (`sdesbench/specs/<table>.yaml`, read through
importlib.resources); `$SDESBENCH_EXPERIMENTS` adds folders of one's own tables, and `run`, `ablate`
and `report` also take the path of a spec file (`find_spec`).

A spec reads like the paper's table: groups (one per network) of rows (one per method), each row
with the paper's numbers (`miou`, `pa`). Method options are given per method name
(`options: {sdes: {tau: 5}}`) at the spec or group level, or per row (`options: {...}` inside the
row). Presets (`paper`, `mini`, `smoke`) hold the protocol, `base` the settings every preset
shares, a group's `config:` (e.g. `{model: {pretrained: false}}`) applies to its rows. A row names
its teacher with `teacher: true` (another trained copy of the row's own network, with the Student row's
configuration, trained with its own seed derived from the row's, `teacher_seed: separate` (the default),
or with the row's seed, `teacher_seed: same`, which makes it the table's Student row itself, shared by
configuration hash) or `teacher: <model name>` (the table's teacher network, at the row's seed).
A sweep spec (fig3) has `sweeps` (one per hyper-parameter) instead of groups.

A spec may extend another (`extends: cirkd`, a name or a path relative to the spec): it is composed with
its base when it loads (`extend_spec`): the base's presets, protocol, options and rows are inherited, a
group named as one of the base's adds rows to it, any other group is new, and `only_groups` keeps some of
the base's groups (docs/tables.md, "Tables that extend ours").

Loading checks every key and type (the same `from_dict` as the run config, the same one-line
errors naming the file and key), every preset's protocol as a run configuration, and every name
(model, method, dataset) against the registries.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sdesbench.config import RunConfig, load_yaml, merge, method_section, parse_config, parse_yaml
from sdesbench.validate import from_dict
from sdesbench.data import DATASETS
from sdesbench.errors import ConfigError
from sdesbench.methods import METHODS
from sdesbench.models import MODELS
from sdesbench.plugins import is_path_source, load_plugins
from sdesbench.registry import BUILT_IN, did_you_mean

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

PRESETS = ("paper", "mini", "smoke")
# macc: mean per-class accuracy; mdice, mfscore: mmsegmentation's mean Dice and F-score (no paper gives them)
Metric = Literal["miou", "pa", "macc", "mdice", "mfscore"]
# the teacher of a `teacher: true` row: trained with its own seed, derived from the row's (`separate`:
# "another pre-trained student"), or with the row's seed (`same`: the table's Student row itself). A
# `teacher: <model>` row always uses the row's seed: its teacher is the table's teacher network, whose
# own row (Table 2's Teacher) reports that very run
TeacherSeed = Literal["separate", "same"]


@dataclass
class Row:
    label: str
    method: str = "student"
    miou: float | None = None  # the paper's numbers
    pa: float | None = None
    metric: Literal["student", "ens_t"] = "student"  # which evaluated prediction the row reports
    teacher: bool | str = False
    teacher_seed: TeacherSeed | None = None  # default: the spec's
    options: dict[str, Any] = field(default_factory=dict)
    show: dict[str, Any] = field(default_factory=dict)  # extra display columns of the paper's table
    params_m: float | None = None  # the paper's Params / FLOPs when the row's differ from its group's
    gflops: float | None = None
    # the split the paper's numbers of this row are on, when not the table's (CIRKD v2 reports Cityscapes test): shown
    # beside the number, never differenced with a measurement on the table's split
    paper_split: str | None = None
    paper_student_miou: float | None = None  # that paper's own Student mIoU on `paper_split`, for its claimed gain

    def paper(self) -> dict[str, float]:
        return {m: v for m, v in (("miou", self.miou), ("pa", self.pa)) if v is not None}


@dataclass
class Group:
    name: str
    model: str
    rows: list[Row]
    config: dict[str, Any] = field(default_factory=dict)  # partial run config for this group's rows
    # per preset, partial run config for this group's rows on top of `config`: a group on another dataset
    # than the table's (CIRKD's CamVid and VOC groups) names its own protocol for `paper`, and none for
    # `smoke`, which then runs on the preset's built-in data like every other group
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method name
    # partial run config for the teacher of this group's rows, over the group's protocol without its `model`
    # section: CIRKD's SegFormer group gives its MiT-B4 teacher no aux head, which the table's base (CIRKD's
    # ResNets) turns on
    teacher_config: dict[str, Any] = field(default_factory=dict)
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
    # per method name, options for this preset only, over the spec's and the group's: CIRKD's memory
    # queues sized for the tiny data in `smoke` (the `paper` preset keeps CIRKD's lengths)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v and k != "options"}


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
    teacher_seed: TeacherSeed = "separate"
    base: dict[str, Any] = field(default_factory=dict)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method name
    groups: list[Group] = field(default_factory=list)
    method: str | None = None  # sweep specs: the swept method and network
    model: str | None = None
    sweeps: dict[str, ParameterSweep] = field(default_factory=dict)
    extends: str | None = None  # the table this one extends (set when the spec is composed with it)
    # plugin sources (sdesbench/plugins.py) loaded when the spec loads and by every process training its runs:
    # .py paths, stored absolute (a spec's relative to its file), or module names; an extension's add to its base's
    plugins: list[str] = field(default_factory=list)

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

    def method_options(self, method: str, group: Group | None = None, preset: str | None = None) -> dict[str, Any]:
        """A method's options from the spec's `options`, then the group's, then the preset's."""
        opts = dict(self.options.get(method, {}))
        if group:
            opts = merge(opts, group.options.get(method, {}))
        if preset:
            opts = merge(opts, self.preset(preset).options.get(method, {}))
        return opts

    def sweep(self, param: str) -> ParameterSweep:
        if param not in self.sweeps:
            raise ConfigError(f"unknown sweep parameter {param!r}; choose {', '.join(self.sweeps)}")
        return self.sweeps[param]


SPEC_SUFFIXES = (".yaml", ".yml")
PACKAGED_SPECS = "specs"  # the paper's tables, shipped inside the package (sdesbench/specs/*.yaml)


def spec_folders() -> list[Path | Traversable]:
    """Where table names are looked up, first match wins: the folders of $SDESBENCH_EXPERIMENTS
    (separated like PATH; a researcher's own tables, which may shadow a paper table of the same name),
    then the paper's tables that ship with the package (found through importlib.resources, so an
    installed wheel knows them as well as a checkout does)."""
    env = os.environ.get("SDESBENCH_EXPERIMENTS", "")
    return [Path(p) for p in env.split(os.pathsep) if p] + [resources.files("sdesbench") / PACKAGED_SPECS]


def is_spec_path(table: str) -> bool:
    """Whether a table argument names a file (`my_table.yaml`, `specs/x.yml`) rather than a table name."""
    return table.endswith(SPEC_SUFFIXES) or "/" in table or os.sep in table


def spec_name(table: str) -> str:
    """The name a table's outputs are filed under (`results/<name>-<preset>.md`): the name itself, or
    the file's stem for a path."""
    return Path(table).stem if is_spec_path(table) else table


def _named_specs() -> dict[str, Path | Traversable]:
    found: dict[str, Path | Traversable] = {}
    for folder in spec_folders():
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            stem, dot, suffix = entry.name.rpartition(".")
            if dot and f".{suffix}" in SPEC_SUFFIXES and entry.is_file():
                found.setdefault(stem, entry)
    return found


def list_tables() -> list[str]:
    return sorted(_named_specs())


def table_origin(table: str) -> str:
    """Where a table name comes from: `built-in` (shipped with the package) or its spec file."""
    source = find_spec(table)
    packaged = resources.files("sdesbench") / PACKAGED_SPECS
    return BUILT_IN if str(source).startswith(str(packaged)) else str(source)


def find_spec(table: str) -> Path | Traversable:
    """The YAML file of a table name or path; one line naming what is known otherwise."""
    if is_spec_path(table):
        path = Path(table).expanduser()
        if not path.is_file():
            raise ConfigError(f"table spec not found: {path}")
        return path
    specs = _named_specs()
    if table not in specs:
        raise ConfigError(f"unknown table {table!r}; known: {', '.join(sorted(specs))}"
                          f"{did_you_mean(table, specs)} (or give the path of a spec file)")
    return specs[table]


def load_spec(table: str) -> Spec:
    """A table name or spec path as a checked `Spec`; a spec that `extends:` another is composed with its
    base first (`extend_spec`), so it is one spec from here on."""
    data, where = _spec_data(table, ())
    name = spec_name(table)
    data.setdefault("name", name)
    data.setdefault("title", name)
    try:
        load_plugins(data.get("plugins") or [])  # before any name is looked up in the registries
        spec = from_dict(Spec, data)
        check_spec(spec)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return spec


def _spec_data(table: str, chain: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    """The YAML mapping of a spec (its base's composed in when it has `extends:`) and the name its errors give."""
    source = find_spec(table)
    where = source.name
    if isinstance(source, Path):
        data = load_yaml(source)
    else:  # a spec inside the package (a wheel may keep it in a zip)
        data = parse_yaml(source.read_text(encoding="utf-8"), where)
    if "presets" not in data and "extends" not in data:
        raise ConfigError(f"{where}: a table spec needs a mapping with 'presets' (or 'extends: <table>')")
    if "only_groups" in data and "extends" not in data:
        raise ConfigError(f"{where}: only_groups keeps some of a base's groups; it needs 'extends: <table>'")
    if "plugins" in data:
        data["plugins"] = _plugin_sources(data["plugins"], source, where)
    if "extends" not in data:
        return data, where
    base = data.pop("extends")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: extends: expected a table name or the path of a spec file, got {base!r}")
    if is_spec_path(base) and isinstance(source, Path) and not Path(base).expanduser().is_absolute():
        base = str(source.parent / base)  # a base's path is read from the extending spec's folder
    here = _identity(source)
    try:
        ident = _identity(find_spec(base))
    except ConfigError as e:
        raise ConfigError(f"{where}: extends {base!r}: {e}") from None
    if ident in chain or ident == here:  # by file: a spec of one's own named as the table it extends is one too
        raise ConfigError(f"{where}: extends {base!r}, which extends it back (a cycle)")
    try:
        base_data, base_where = _spec_data(base, (*chain, here))
    except ConfigError as e:
        raise ConfigError(f"{where}: extends {base!r}: {e}") from None
    try:
        return extend_spec(base_data, data, spec_name(base), spec_name(table)), where
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _identity(source: Path | Traversable) -> str:
    """Which file a spec is, whatever name or path reached it (for finding a cycle of `extends`)."""
    return str(source.resolve()) if isinstance(source, Path) else str(source)


def _plugin_sources(value: Any, source: Path | Traversable, where: str) -> list[str]:
    """A spec's `plugins:` with each file's path made absolute from the spec's folder (module names kept)."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: plugins: expected a list of .py files or module names, got {value!r}")
    folder = source.parent if isinstance(source, Path) else Path.cwd()
    return [str((folder / Path(v).expanduser()).resolve()) if is_path_source(v) else v.strip() for v in value]


# the keys of a group entry that names one of the base's groups: its rows are added, its settings are the base's
EXTENDED_GROUP_KEYS = ("name", "rows", "model")


def extend_spec(base: dict[str, Any], ext: dict[str, Any], base_name: str, name: str) -> dict[str, Any]:
    """A base spec's mapping with an extension's composed in (docs/tables.md, "Tables that extend ours").

    The extension inherits the base's presets, protocol (`base`), method options, reference numbers and
    display settings; what it names itself is merged over them (a preset's or the protocol's sections
    key by key, method options per method). `only_groups` keeps those of the base's groups. A group named
    as one of the base's adds its rows to it (no settings of its own: those are the base's, so the base's
    rows keep their configuration hashes); any other group is a new one, after the base's."""
    if base.get("sweeps") and not base.get("groups"):
        raise ConfigError(f"extends {base_name!r}: a sweep spec has no groups to extend")
    out = {k: v for k, v in base.items() if k not in ("name", "title")}
    out["extends"] = base_name
    out["title"] = ext.get("title", f"{base.get('title', base_name)}, extended by {name}")
    for key, value in ext.items():
        if key in ("groups", "only_groups", "title"):
            continue
        if key == "presets":
            out["presets"] = _merge_presets(base.get("presets") or {}, _mapping(value, "presets"))
        elif key == "options":
            out["options"] = _merge_options(base.get("options") or {}, _mapping(value, "options"))
        elif key == "base":
            out["base"] = merge(base.get("base") or {}, _mapping(value, "base"))
        elif key == "plugins":
            out["plugins"] = [*(base.get("plugins") or []), *(value or [])]
        else:
            out[key] = value
    groups = [g for g in base.get("groups") or [] if isinstance(g, dict)]
    names = [g.get("name") for g in groups]
    keep = ext.get("only_groups")
    if keep is not None:
        if not isinstance(keep, list) or not keep or not all(isinstance(n, str) for n in keep):
            raise ConfigError(f"only_groups: expected a list of group names of {base_name!r}, got {keep!r}")
        for n in keep:
            if n not in names:
                raise ConfigError(f"only_groups: {base_name!r} has no group {n!r}{did_you_mean(n, names)}; "
                                  f"it has: {', '.join(map(str, names))}")
        groups = [g for g in groups if g.get("name") in keep]
    groups = [dict(g, rows=list(g.get("rows") or [])) for g in groups]
    by_name = {g["name"]: g for g in groups}
    for i, entry in enumerate(ext.get("groups") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"groups[{i}]: expected a mapping with a 'name'")
        name = entry["name"]
        if name not in by_name:
            if name in names:
                raise ConfigError(f"group {name!r} is one of {base_name!r}'s but not in only_groups")
            groups.append(entry)
            by_name[name] = entry
            continue
        group = by_name[name]
        extra = [k for k in entry if k not in EXTENDED_GROUP_KEYS]
        if extra:
            raise ConfigError(f"group {name!r} is {base_name!r}'s: it adds rows, its settings ({', '.join(extra)}) "
                              f"are the base's (give options per row, or name a new group)")
        if entry.get("model", group.get("model")) != group.get("model"):
            raise ConfigError(f"group {name!r} is {base_name!r}'s, with model {group.get('model')!r}, not "
                              f"{entry['model']!r} (name a new group for another network)")
        rows = entry.get("rows") or []
        if not isinstance(rows, list):
            raise ConfigError(f"group {name!r} rows: expected a list")
        labels = {r.get("label") for r in group["rows"] if isinstance(r, dict)}
        for r in rows:
            if isinstance(r, dict) and r.get("label") in labels:
                raise ConfigError(f"group {name!r} already has a row {r['label']!r}; give the new row another label")
        group["rows"] += rows
    out["groups"] = groups
    return out


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def _merge_options(base: dict[str, Any], ext: dict[str, Any]) -> dict[str, Any]:
    """Method options per method name: the extension's options of a method over the base's."""
    out = dict(base)
    for method, opts in ext.items():
        out[method] = {**(out.get(method) or {}), **_mapping(opts, f"options.{method}")}
    return out


def _merge_presets(base: dict[str, Any], ext: dict[str, Any]) -> dict[str, Any]:
    """Presets by name, each section merged key by key (a preset's `options` per method)."""
    out = dict(base)
    for name, preset in ext.items():
        merged = dict(out.get(name) or {})
        for section, value in _mapping(preset, f"presets.{name}").items():
            if section == "options":
                merged[section] = _merge_options(merged.get(section) or {}, _mapping(value, f"presets.{name}.options"))
            else:
                merged[section] = merge(merged.get(section) or {}, _mapping(value, f"presets.{name}.{section}"))
        out[name] = merged
    return out


def check_spec(spec: Spec) -> None:
    """Every preset is a valid run configuration, every name is registered (with a did-you-mean)."""
    for name in spec.presets:
        settings = spec.preset_settings(name)
        if "method" in settings:
            settings["method"] = method_section(settings["method"])
        _check_partial(settings, f"presets.{name}")
    for group in spec.groups:  # an unknown name is an error (with a did-you-mean), never "not implemented yet"
        _check_partial(group.config, f"group {group.name!r} config")
        _check_partial(group.teacher_config, f"group {group.name!r} teacher_config")
        for preset, settings in group.presets.items():
            if preset not in spec.presets:
                raise ConfigError(f"group {group.name!r} has settings for preset {preset!r}, which the table does "
                                  f"not have ({', '.join(spec.presets)})")
            _check_partial(merge(group.config, settings), f"group {group.name!r} presets.{preset}")
        MODELS.get(group.model)
        for row in group.rows:
            METHODS.get(row.method)
            if isinstance(row.teacher, str):
                MODELS.get(row.teacher)
    for method in [*spec.options, *(m for p in spec.presets.values() for m in p.options)]:
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
