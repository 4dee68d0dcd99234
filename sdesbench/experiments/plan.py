"""A table's runs: expanding a spec at a preset and seeds into planned runs, teachers first.

`Sweep` names what a command works on (table, preset, seeds, results folder, `--set` overrides);
`expand` makes one `PlannedRun` per (row, seed), plus one teacher run per distinct teacher, placed
before the students that need it. Run folders are keyed by the configuration hash
(`results/runs/<dataset>/<model>/<method>/<hash>`), so identical runs are done once (`Ens-T` is read
from the `Ours` run, a teacher is shared by every student that names it) and a finished run is
never redone. A row whose configuration is rejected (e.g. more experts than classes) is still
planned, with the protocol it would use and the reason it is skipped, so `--dry-run` and the
report show it as skipped, never as a number.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdesbench.config import RunConfig, apply_overrides, merge, method_section
from sdesbench.engine.configure import build_config
from sdesbench.engine.record import RunRecord, read_record
from sdesbench.errors import ConfigError, StorageError
from sdesbench.experiments.spec import Group, Row, Spec, load_spec
from sdesbench.experiments.sweeps import sweep_groups

# method option -> protocol column shown by `--dry-run` and in reports
PROTOCOL_OPTIONS = {"tau": "tau", "n_experts": "N", "expert": "expert"}


@dataclass(frozen=True)
class Sweep:
    """What `run`, `ablate` and `report` work on: a table at a preset, over seeds, in a results folder,
    with the `--set` overrides the runs are made with (they are part of each run's hash)."""

    table: str
    preset: str = "smoke"
    seeds: tuple[int, ...] = (0,)
    results: Path = Path("results")
    overrides: tuple[str, ...] = ()

    def spec(self) -> Spec:
        return load_spec(self.table)

    def plans(self, spec: Spec | None = None) -> list["PlannedRun"]:
        return expand(spec or self.spec(), self)

    @property
    def title(self) -> str:
        return f"{self.table} ({self.preset})"

    def with_table(self, table: str) -> "Sweep":
        return dataclasses.replace(self, table=table)


@dataclass
class PlannedRun:
    key: str  # "<group>/<row>" or "teacher:<model>"
    group: str
    row: str
    seed: int
    cfg: RunConfig | None
    paper: dict[str, float] = field(default_factory=dict)
    metric_source: str = "student"  # which evaluated prediction this row reports (student | ens_t)
    depends_on: list[str] = field(default_factory=list)  # run dirs that must finish first
    skipped: str | None = None  # reason the row cannot run
    is_teacher: bool = False
    model: str = ""
    method: str = "student"
    protocol: dict[str, Any] = field(default_factory=dict)  # iters, crop, batch, lr, splits, tau, N, expert, teacher
    show: dict[str, Any] = field(default_factory=dict)  # extra display columns of the paper's table
    group_spec: Group | None = None
    row_spec: Row | None = None

    @property
    def out(self) -> Path | None:
        return Path(self.cfg.output.dir) if self.cfg else None

    def record(self) -> RunRecord | None:
        return read_record(self.out)

    def done(self) -> bool:
        try:
            rec = self.record()
        except StorageError:
            return False
        return bool(rec and rec.completed and rec.config_hash == self.cfg.identity_hash())


def run_dir(results: Path, cfg: RunConfig) -> Path:
    return Path(results) / "runs" / cfg.data.name / cfg.model.name / cfg.method.name / cfg.identity_hash()


def protocol_of(data: dict[str, Any], overrides: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The protocol a run would use, read from its settings (so skipped rows show it too)."""
    d = dict(data)
    if "method" in d:
        d["method"] = method_section(d["method"])
    try:
        d = apply_overrides(d, list(overrides))
    except ConfigError:
        pass  # the run itself reports a bad --set
    train, dat = d.get("train", {}), d.get("data", {})
    meth = dict((d.get("method") or {}).get("options", {}))
    crop = dat.get("crop", [64, 64])
    proto = {"iters": train.get("iters", 300), "crop": crop if isinstance(crop, list) else [crop, crop],
             "batch": dat.get("batch_size", 8), "lr": train.get("lr", 0.01), "dataset": dat.get("name", "tiny"),
             "train_split": dat.get("train_split", "train"), "eval_split": dat.get("eval_split", "val")}
    for opt, col in PROTOCOL_OPTIONS.items():
        if opt in meth:
            proto[col] = meth[opt]
    if (d.get("teacher") or {}).get("model"):
        proto["teacher"] = d["teacher"]["model"]
    return proto


def expand(spec: Spec, sweep: Sweep) -> list[PlannedRun]:
    """All runs of a table for a preset: teachers first, then rows x seeds (skips explained)."""
    base = spec.preset_settings(sweep.preset)
    overrides = list(sweep.overrides)
    teachers: dict[str, PlannedRun] = {}
    planned: list[PlannedRun] = []

    def configure(pr: PlannedRun, data: dict[str, Any], sets: list[str]) -> None:
        pr.protocol = protocol_of(data, sets)
        if pr.skipped:
            return
        try:
            cfg = build_config(data, sets)
        except ConfigError as e:
            pr.skipped = f"invalid configuration: {e}"
            return
        cfg.output.dir = str(run_dir(sweep.results, cfg))
        pr.cfg = cfg

    def teacher_run(name: str, group_base: dict[str, Any], seed: int) -> PlannedRun:
        data = merge(group_base, {"model": {"name": name}, "method": {"name": "student"}, "train": {"seed": seed}})
        pr = PlannedRun(key=f"teacher:{name}", group="teacher", row=name, seed=seed, cfg=None, is_teacher=True,
                        model=name)
        # the spec's and the user's settings apply to the teacher too, except method options
        configure(pr, data, [o for o in overrides if not o.startswith("method.")])
        ident = str(pr.out) if pr.cfg else f"{pr.key}:{seed}:{json.dumps(pr.protocol, sort_keys=True)}"
        return teachers.setdefault(ident, pr)

    groups = sweep_groups(spec) if spec.is_sweep else spec.groups
    for group in groups:
        group_base = merge(base, group.config)
        for row in group.rows:
            for seed in sweep.seeds:
                pr = PlannedRun(key=f"{group.name}/{row.label}", group=group.name, row=row.label, seed=seed, cfg=None,
                                paper=row.paper(), metric_source=row.metric, model=group.model, method=row.method,
                                show=dict(row.show), group_spec=group, row_spec=row)
                options = merge(spec.method_options(row.method, group), row.options)
                data = merge(group_base, {"model": {"name": group.model},
                                          "method": {"name": row.method, **options}, "train": {"seed": seed}})
                if row.teacher:
                    tname = row.teacher if isinstance(row.teacher, str) else group.model
                    t = teacher_run(tname, group_base, seed)
                    data = merge(data, {"teacher": {"model": tname}})
                    if t.cfg is not None:
                        data = merge(data, {"teacher": {"checkpoint": str(t.out / "checkpoints" / "last.pt")}})
                        pr.depends_on.append(str(t.out))
                    else:
                        pr.skipped = f"teacher {tname}: {t.skipped}"
                configure(pr, data, overrides)
                planned.append(pr)
    return list(teachers.values()) + planned


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds expects non-negative integers, got {text!r}")
    return seeds
