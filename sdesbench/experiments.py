"""Experiment specs (`experiments/<table>.yaml`) and their expansion into runs.

A spec reads like the paper's table: groups (one per network) of rows (one per method), each
row with the paper's number. Method options are given per method name (`options: {sdes: {tau: 5}}`)
at the spec or group level, or per row (`options: {...}` inside the row). Presets (`paper`, `mini`, `smoke`) hold the protocol; `base` holds
settings shared by every preset. Expansion makes one `RunConfig` per (row, seed), plus one
teacher run per distinct teacher, placed before the students that need it.

Run folders are keyed by the configuration hash (`results/runs/<dataset>/<model>/<method>/<hash>`),
so identical runs are done once (e.g. `Ens-T` is read from the `Ours` run, and a teacher is
shared by every student that names it) and a finished run is never redone.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdesbench.config import RunConfig, build_config, merge
from sdesbench.errors import ConfigError
from sdesbench.registry import DATASETS, METHODS, MODELS

PRESETS = ("paper", "mini", "smoke")


def experiments_dir() -> Path:
    """`experiments/` of the checkout (or $SDESBENCH_EXPERIMENTS)."""
    import os

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
    spec = yaml.safe_load(path.read_text())
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


def expand(spec: dict[str, Any], preset: str, seeds: list[int], results: Path,
           overrides: list[str] | None = None) -> list[PlannedRun]:
    """All runs of a table for a preset: teachers first, then rows x seeds (skips explained)."""
    if preset not in spec.get("presets", {}):
        raise ConfigError(f"table {spec['name']!r} has no preset {preset!r}; it has: "
                          f"{', '.join(spec.get('presets', {}))}")
    pdef = copy.deepcopy(spec["presets"][preset])
    stand_in = pdef.pop("stand_in", None)  # model to use where the table's model does not exist yet
    base = merge(copy.deepcopy(spec.get("base", {})), pdef)
    teachers: dict[str, PlannedRun] = {}
    planned: list[PlannedRun] = []

    def resolve_model(name: str) -> tuple[str | None, str | None]:
        if name in MODELS:
            return name, None
        if stand_in and stand_in in MODELS:
            return stand_in, f"{stand_in} stands in for {name} (not implemented yet)"
        return None, f"model {name} is not implemented yet"

    def teacher_run(tmodel: str, seed: int) -> PlannedRun:
        data = merge(base, {"model": {"name": tmodel}, "method": {"name": "student"}})
        data = merge(data, {"train": {"seed": seed}})
        # the spec's and the user's settings apply to the teacher too, except method options
        cfg = build_config(data, [o for o in overrides or [] if not o.startswith("method.")])
        cfg.output.dir = str(run_dir(results, cfg))
        key = str(cfg.output.dir)
        if key not in teachers:
            teachers[key] = PlannedRun(key=f"teacher:{tmodel}", group="teacher", row=tmodel, seed=seed, cfg=cfg,
                                       is_teacher=True)
        return teachers[key]

    for group in spec.get("groups", []):
        gname = group["name"]
        model, note = resolve_model(group["model"])
        for row in group["rows"]:
            label = row["label"]
            method = row.get("method", "student")
            paper = {k: row[k] for k in ("miou", "pa") if k in row}
            for seed in seeds:
                pr = PlannedRun(key=f"{gname}/{label}", group=gname, row=label, seed=seed, cfg=None, paper=paper,
                                metric_source=row.get("metric", "student"))
                if model is None:
                    pr.skipped = note
                elif method not in METHODS:
                    pr.skipped = f"method {method} is not implemented yet"
                else:
                    pr.stand_in = note
                    data = merge(base, {"model": {"name": model}})
                    opts = merge(spec.get("options", {}).get(method, {}), group.get("options", {}).get(method, {}))
                    data = merge(data, {"method": {"name": method, **opts, **row.get("options", {})}})
                    data = merge(data, {"train": {"seed": seed}})
                    if row.get("teacher"):
                        tmodel = row["teacher"] if isinstance(row["teacher"], str) else group["model"]
                        tmodel, tnote = resolve_model(tmodel)
                        if tmodel is None:
                            pr.skipped = tnote
                        else:
                            t = teacher_run(tmodel, seed)
                            data = merge(data, {"teacher": {"model": tmodel,
                                                            "checkpoint": str(t.out / "checkpoints" / "last.pt")}})
                            pr.depends_on.append(str(t.out))
                    if pr.skipped is None:
                        try:
                            cfg = build_config(data, overrides)
                        except ConfigError as e:
                            pr.skipped = f"invalid configuration: {e}"
                        else:
                            cfg.output.dir = str(run_dir(results, cfg))
                            pr.cfg = cfg
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


def check_names(spec: dict[str, Any]) -> None:
    """Dataset names in presets must exist (models/methods may be missing: rows are skipped)."""
    for preset, pdef in spec.get("presets", {}).items():
        name = (pdef.get("data") or {}).get("name") or (spec.get("base", {}).get("data") or {}).get("name")
        if name:
            DATASETS.get(name)
