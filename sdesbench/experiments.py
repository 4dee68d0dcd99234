"""Experiment specs (`experiments/<table>.yaml`) and their expansion into runs.

A spec reads like the paper's table: groups (one per network) of rows (one per method), each
row with the paper's numbers (`miou`, `pa`). Method options are given per method name
(`options: {sdes: {tau: 5}}`) at the spec or group level, or per row (`options: {...}` inside
the row). Presets (`paper`, `mini`, `smoke`) hold the protocol; `base` holds settings shared by
every preset; a group's `config:` (e.g. `{model: {pretrained: false}}`) applies to its rows.
Expansion makes one `RunConfig` per (row, seed), plus one teacher run per distinct teacher,
placed before the students that need it. A row names its teacher with `teacher: true` (another
trained copy of the row's own network: the table's Student row of the same seed, shared by
configuration hash) or `teacher: <model name>`.

Run folders are keyed by the configuration hash (`results/runs/<dataset>/<model>/<method>/<hash>`),
so identical runs are done once (e.g. `Ens-T` is read from the `Ours` run, and a teacher is
shared by every student that names it) and a finished run is never redone.

A row that cannot run yet (its model, dataset or method is not implemented, or its options are
rejected) is still planned, with the protocol it would use and the reason it is skipped, so
`--dry-run` and the report show it as skipped, never as a number.
"""
from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdesbench.config import RunConfig, build_config, merge
from sdesbench.errors import ConfigError
from sdesbench.registry import DATASETS, METHODS, MODELS

PRESETS = ("paper", "mini", "smoke")
PAPER_METRICS = ("miou", "pa")
# method option -> protocol column shown by `--dry-run` and in reports
PROTOCOL_OPTIONS = {"tau": "tau", "n_experts": "N", "expert": "expert"}


def experiments_dir() -> Path:
    """`experiments/` of the checkout (or $SDESBENCH_EXPERIMENTS)."""
    env = os.environ.get("SDESBENCH_EXPERIMENTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "experiments"


def list_tables() -> list[str]:
    return sorted(p.stem for p in experiments_dir().glob("*.yaml"))


def load_spec(table: str) -> dict[str, Any]:
    path = experiments_dir() / f"{table}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown table {table!r}; known: {', '.join(list_tables())}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict) or "presets" not in spec:
        raise ConfigError(f"{path}: a table spec needs a mapping with 'presets'")
    spec.setdefault("name", table)
    return spec


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


@dataclass
class PlannedRun:
    key: str  # "<group>/<row>" or "teacher:<model>"
    group: str
    row: str
    seed: int
    cfg: RunConfig | None
    paper: dict[str, Any] = field(default_factory=dict)
    metric_source: str = "student"  # which evaluated prediction this row reports (student | ens_t)
    depends_on: list[str] = field(default_factory=list)  # run dirs that must finish first
    skipped: str | None = None  # reason the row cannot run yet
    stand_in: str | None = None  # note when another model stands in for the table's
    is_teacher: bool = False
    model: str = ""  # the table's model for this row (not the stand-in)
    method: str = "student"
    protocol: dict[str, Any] = field(default_factory=dict)  # iters, crop, batch, lr, tau, N, expert, teacher
    show: dict[str, Any] = field(default_factory=dict)  # extra display columns of the paper's table

    @property
    def out(self) -> Path | None:
        return Path(self.cfg.output.dir) if self.cfg else None

    def done(self) -> bool:
        rec = read_record(self.out) if self.out else None
        return bool(rec and rec.get("status") == "completed" and rec.get("config_hash") == self.cfg.identity_hash())


def read_record(folder: Path | None) -> dict[str, Any] | None:
    if folder is None:
        return None
    p = folder / "results.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_dir(results: Path, cfg: RunConfig) -> Path:
    return results / "runs" / cfg.data.name / cfg.model.name / cfg.method.name / cfg.identity_hash()


def protocol_of(data: dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """The protocol a run would use, read from its unvalidated settings (so skipped rows show it too)."""
    from sdesbench.config import parse_override

    d = copy.deepcopy(data)
    for text in overrides or []:  # apply --set the way build_config does, without validation
        try:
            parts, value = parse_override(text)
        except ConfigError:
            continue
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[parts[-1]] = value
    train, dat, meth = d.get("train", {}), d.get("data", {}), dict(d.get("method", {}))
    meth.update(meth.pop("options", {}) or {})
    crop = dat.get("crop", [64, 64])
    proto = {"iters": train.get("iters", 300), "crop": crop if isinstance(crop, list) else [crop, crop],
             "batch": dat.get("batch_size", 8), "lr": train.get("lr", 0.01), "dataset": dat.get("name", "tiny")}
    for opt, col in PROTOCOL_OPTIONS.items():
        if opt in meth:
            proto[col] = meth[opt]
    if d.get("teacher", {}).get("model"):
        proto["teacher"] = d["teacher"]["model"]
    return proto


def _spec_base(spec: dict[str, Any], preset: str) -> tuple[dict[str, Any], str | None]:
    if preset not in spec.get("presets", {}):
        raise ConfigError(f"table {spec['name']!r} has no preset {preset!r}; it has: "
                          f"{', '.join(spec.get('presets', {}))}")
    pdef = copy.deepcopy(spec["presets"][preset])
    stand_in = pdef.pop("stand_in", None)  # model to use where the table's model does not exist yet
    return merge(copy.deepcopy(spec.get("base", {})), pdef), stand_in


def expand(spec: dict[str, Any], preset: str, seeds: list[int], results: Path,
           overrides: list[str] | None = None) -> list[PlannedRun]:
    """All runs of a table for a preset: teachers first, then rows x seeds (skips explained)."""
    base, stand_in = _spec_base(spec, preset)
    if spec.get("sweeps") and not spec.get("groups"):  # fig3: every sweep is a group
        spec = {**spec, "groups": [sweep_spec(spec, p)["groups"][0] for p in spec["sweeps"]]}
    teachers: dict[str, PlannedRun] = {}
    planned: list[PlannedRun] = []
    dataset = (base.get("data") or {}).get("name", "tiny")
    data_note = None if dataset in DATASETS else f"dataset {dataset} is not implemented yet"

    def resolve_model(name: str) -> tuple[str | None, str | None]:
        if name in MODELS:
            return name, None
        if stand_in and stand_in in MODELS:
            return stand_in, f"{stand_in} stands in for {name} (not implemented yet)"
        return None, f"model {name} is not implemented yet"

    def configure(pr: PlannedRun, data: dict[str, Any], sets: list[str]) -> None:
        pr.protocol = protocol_of(data, sets)
        if pr.skipped:
            return
        try:
            cfg = build_config(data, sets)
        except ConfigError as e:
            pr.skipped = f"invalid configuration: {e}"
            return
        cfg.output.dir = str(run_dir(results, cfg))
        pr.cfg = cfg

    def teacher_run(name: str, group_base: dict[str, Any], seed: int) -> PlannedRun:
        tmodel, tnote = resolve_model(name)
        data = merge(group_base, {"model": {"name": tmodel or name}, "method": {"name": "student"},
                                  "train": {"seed": seed}})
        pr = PlannedRun(key=f"teacher:{name}", group="teacher", row=name, seed=seed, cfg=None, is_teacher=True,
                        model=name, skipped=data_note or (tnote if tmodel is None else None),
                        stand_in=tnote if tmodel else None)
        # the spec's and the user's settings apply to the teacher too, except method options
        configure(pr, data, [o for o in overrides or [] if not o.startswith("method.")])
        ident = str(pr.out) if pr.cfg else f"{pr.key}:{seed}:{json.dumps(pr.protocol, sort_keys=True)}"
        return teachers.setdefault(ident, pr)

    for group in spec.get("groups", []):
        gname = group["name"]
        group_base = merge(base, group.get("config", {}))
        model, note = resolve_model(group["model"])
        for row in group["rows"]:
            label = row["label"]
            method = row.get("method", "student")
            paper = {k: row[k] for k in PAPER_METRICS if k in row}
            for seed in seeds:
                pr = PlannedRun(key=f"{gname}/{label}", group=gname, row=label, seed=seed, cfg=None, paper=paper,
                                metric_source=row.get("metric", "student"), model=group["model"], method=method,
                                show=dict(row.get("show", {})))
                opts = merge(spec.get("options", {}).get(method, {}), group.get("options", {}).get(method, {}))
                data = merge(group_base, {"model": {"name": model or group["model"]},
                                          "method": {"name": method, **opts, **row.get("options", {})},
                                          "train": {"seed": seed}})
                if data_note:
                    pr.skipped = data_note
                elif model is None:
                    pr.skipped = note
                elif method not in METHODS:
                    pr.skipped = f"method {method} is not implemented yet"
                else:
                    pr.stand_in = note
                if row.get("teacher"):
                    tname = row["teacher"] if isinstance(row["teacher"], str) else group["model"]
                    t = teacher_run(tname, group_base, seed)
                    data = merge(data, {"teacher": {"model": (t.cfg.model.name if t.cfg else tname)}})
                    if t.cfg is not None:
                        data = merge(data, {"teacher": {"checkpoint": str(t.out / "checkpoints" / "last.pt")}})
                        pr.depends_on.append(str(t.out))
                    elif pr.skipped is None:
                        pr.skipped = f"teacher {tname}: {t.skipped}"
                configure(pr, data, list(overrides or []))
                planned.append(pr)
    return list(teachers.values()) + planned


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds expects non-negative integers, got {text!r}")
    return seeds


# ----------------------------------------------------------------------------- Figure 3 sweeps


def _sweep(spec: dict[str, Any], param: str) -> dict[str, Any]:
    sweeps = spec.get("sweeps", {})
    if param not in sweeps:
        raise ConfigError(f"unknown sweep parameter {param!r}; choose {', '.join(sweeps)}")
    return sweeps[param]


def sweep_spec(spec: dict[str, Any], param: str, values: list[Any] | None = None) -> dict[str, Any]:
    """A sweep spec (fig3.yaml) restricted to one parameter: one row of the swept method per value.

    The sweep spec names `method`, `model`, shared `options`, and per parameter `option` (the
    method option it sets), default `values`, `domain` [lo, hi] and `integer`. The resulting
    spec has one group (the parameter) and is expanded like any table.
    """
    sw = _sweep(spec, param)
    values = list(sw["values"]) if values is None else values
    option = sw.get("option", param)
    rows = [{"label": f"{param}={v}", "method": spec["method"], "options": {option: v}} for v in values]
    return {**spec, "groups": [{"name": param, "model": spec["model"], "rows": rows}]}


def parse_sweep_values(spec: dict[str, Any], param: str, text: str | None) -> list[Any]:
    """`--values 0.1,0.5` -> numbers, checked against the parameter's domain (one-line errors)."""
    sw = _sweep(spec, param)
    if text is None:
        return list(sw["values"])
    integer = bool(sw.get("integer"))
    values: list[Any] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        try:
            v: Any = int(tok) if integer else float(tok)
        except ValueError:
            kind = "integers" if integer else "numbers"
            raise ConfigError(f"--values for {param} expects comma-separated {kind}, got {tok!r}") from None
        values.append(v)
    if not values:
        raise ConfigError(f"--values for {param} is empty")
    lo, hi = sw.get("domain", [None, None])
    for v in values:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{param}={v} is out of range [{lo if lo is not None else '-inf'}, "
                              f"{hi if hi is not None else 'inf'}]")
    # the method's own Options validation, when the method exists
    if spec["method"] in METHODS:
        cls = METHODS.get(spec["method"])
        for v in values:
            cls.parse_options({**spec.get("options", {}).get(spec["method"], {}), sw.get("option", param): v})
    return values


def sweep_log(results: Path, preset: str) -> Path:
    return results / f"fig3-{preset}.sweeps.json"


def _read_sweep_log(results: Path, preset: str) -> dict[str, list[Any]]:
    """Values `ablate` ran beyond the spec's, per parameter ({} when absent or unreadable)."""
    path = sweep_log(results, preset)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def record_sweep_values(results: Path, preset: str, param: str, values: list[Any]) -> None:
    """Remember values run by `sdesbench ablate` beyond the spec's, so `report fig3` plots them."""
    from sdesbench.engine.io import write_json

    known = _read_sweep_log(results, preset)
    known[param] = sorted(set(known.get(param, [])) | set(values))
    write_json(sweep_log(results, preset), known)


def sweep_values(spec: dict[str, Any], results: Path, preset: str, param: str) -> list[Any]:
    """The spec's values for a parameter plus any `ablate` added (sorted)."""
    return sorted(set(spec["sweeps"][param]["values"]) | set(_read_sweep_log(results, preset).get(param, [])))
