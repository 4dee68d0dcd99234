"""The report's optional columns: which metrics it shows (`report --columns miou,pa,macc,mdice,mfscore`; mDice
and mFscore from records of schema 6 on), the numbers of an
extra evaluation of each run (`report --eval-set ...`, read from the records `sdesbench eval --record` writes),
Params / FLOPs of each row's network (the spec's `profile:` setting: class count and input size of the paper's
figures) and training cost from the run records."""
from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdesbench.config import RunConfig, apply_overrides, parse_config
from sdesbench.engine.inference import Inference
from sdesbench.engine.metrics import miou_convention
from sdesbench.engine.record import RunRecord, cost_of, read_evaluation, read_record
from sdesbench.errors import ConfigError, StorageError
from sdesbench.experiments.plan import PlannedRun
from sdesbench.experiments.spec import Metric, Spec
from sdesbench.engine.cost import CostCache, flops_per_image, train_flops_ratio
from sdesbench.measure.costs import cached_profile, ensemble_profile
from sdesbench.report.numbers import fmt


METRICS: tuple[str, ...] = typing.get_args(Metric)  # what `--columns` may name: miou, pa, macc, mdice, mfscore
METRIC_LABEL = {"miou": "mIoU", "pa": "PA", "macc": "mAcc", "mdice": "mDice", "mfscore": "mFscore"}
RECORD_KEY = {"miou": "miou", "pa": "pixel_acc", "macc": "macc", "mdice": "mdice", "mfscore": "mfscore"}  # -> `Scores`


def metric_columns(text: str) -> tuple[str, ...]:
    """`--columns miou,pa,macc` -> the metrics shown, in that order; one line naming the choices otherwise."""
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in METRICS]
    if not names or unknown:
        raise ConfigError(f"--columns takes a comma-separated list of {', '.join(METRICS)}, got {text!r}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class ExtraEvaluation:
    """A second evaluation of every run beside the table's own (`report --eval-set eval.k=v ...`, e.g.
    multi-scale + flip): each run's settings with the overrides applied name the evaluation record that
    `sdesbench eval --record` wrote in the run folder (`<run>/evaluations/<key>.json`, `RunConfig.evaluation_key`),
    which must be of the run's recorded checkpoint (same run key and iteration); a run without one shows
    `missing` with the command that makes it."""

    sets: tuple[str, ...]

    @classmethod
    def parse(cls, sets: tuple[str, ...] | list[str]) -> "ExtraEvaluation | None":
        for text in sets:
            if not text.split("=", 1)[0].strip().startswith("eval."):
                raise ConfigError(f"--eval-set takes eval.* settings, got {text!r}")
        if sets:
            parse_config({}, list(sets))  # a bad value fails here, in one line, before the table is built
        return cls(tuple(sets)) if sets else None

    def config(self, cfg: RunConfig) -> RunConfig:
        return parse_config(apply_overrides(cfg.to_dict(), list(self.sets)))

    def label(self, cfg: RunConfig) -> str:
        return Inference.of(self.config(cfg).eval).short_label()

    def describe(self, cfg: RunConfig) -> str:
        ev = self.config(cfg).eval
        return f"{Inference.of(ev).describe()}; {miou_convention(ev.absent_classes)}"

    def value(self, plan: PlannedRun, rec: RunRecord, metric: str,
              checkpoint: Literal["last", "best"] = "last") -> tuple[float | None, str | None]:
        """(the metric in %, None) from the run's evaluation record of its `checkpoint`, or (None, why not)."""
        cfg = self.config(plan.cfg)
        split = cfg.data.eval_split
        try:
            ev = read_evaluation(plan.out, cfg.evaluation_key(split), checkpoint)
        except StorageError as e:
            return None, f"unreadable: {e}"
        how = f"sdesbench eval {plan.out}/checkpoints/{checkpoint}.pt --record " + \
            " ".join(f"--set '{s}'" for s in self.sets)
        if ev is None:
            return None, f"missing: no {self.label(plan.cfg)} evaluation of the {checkpoint} checkpoint in {plan.out} ({how})"
        iteration = rec.iterations if checkpoint == "last" else (rec.best.iteration if rec.best else None)
        if ev.run_config_hash != rec.config_hash or ev.iteration != iteration:
            return None, f"stale: the {self.label(plan.cfg)} evaluation in {plan.out} scored another checkpoint ({how})"
        scores = ev.scores(plan.metric_source)
        v = getattr(scores, RECORD_KEY[metric], None) if scores else None
        if v is None:
            return None, f"missing: no {plan.metric_source} {metric} in the {self.label(plan.cfg)} evaluation of {plan.out}"
        return 100.0 * v, None


class SizeColumns:
    """Params / FLOPs of a row's network at the paper's input size, as `sdesbench profile` counts them.

    A row that reports another prediction than the student's (Ens-T) is sized as that predictor: the
    student plus the method's expert decoders, from the row's run configuration.
    """

    def __init__(self, spec: Spec, results: Path):
        self.profile = spec.profile
        self.columns = list(spec.profile.columns) if spec.profile else []
        self.cache = CostCache(results)
        self.notes: set[str] = set()

    def cells(self, plan: PlannedRun) -> dict[str, Any]:
        if not self.columns:
            return {}
        paper_params, paper_flops = paper_size(plan)
        nc, hw = self.profile.num_classes, list(self.profile.input_hw)
        if plan.metric_source == "student":
            prof: dict[str, Any] | None = cached_profile(self.cache, plan.model, nc, hw)
        elif plan.cfg is not None:
            key = f"ensemble:{plan.cfg.model.name}:{plan.cfg.method.name}:{sorted(plan.cfg.method.options.items())}"
            prof = self.cache.get(f"{key}:{nc}:{hw}", lambda: ensemble_profile(plan.cfg, nc, hw))
            unsized = " (the paper gives no size for it)" if paper_params is None and paper_flops is None else ""
            self.notes.add(f"{plan.row}: the student plus the method's expert decoders, profiled like a network{unsized}.")
        else:
            prof = None
        out: dict[str, Any] = {}
        if "params" in self.columns:
            out["Params (M)"] = f"{prof['params_m']:.2f}" if prof else "—"
            out["paper Params"] = f"{paper_params:.2f}" if paper_params is not None else "—"
        if "flops" in self.columns:
            out["FLOPs (G)"] = f"{prof['gflops']:.2f}" if prof and prof.get("gflops") is not None else "—"
            out["paper FLOPs"] = f"{paper_flops:.2f}" if paper_flops is not None else "—"
        return out


def paper_size(plan: PlannedRun) -> tuple[float | None, float | None]:
    """The paper's (Params M, GFLOPs) of the network a row reports: the row's own figures, else its
    group's. A row reporting another prediction than the student (Ens-T) takes only its own: the
    group's figures are the student's, and the paper sizes the ensemble only in Table 2's text."""
    group, row = plan.group_spec, plan.row_spec
    own = (row.params_m, row.gflops) if row else (None, None)
    if plan.metric_source != "student" or group is None:
        return own
    return (own[0] if own[0] is not None else group.params_m, own[1] if own[1] is not None else group.gflops)


COST_COLUMNS = ("step s/iter", "wall s", "peak MB", "train FLOPs ×")


def cost_cells(records: list[tuple[PlannedRun, RunRecord]], cache: CostCache) -> dict[str, Any]:
    """Training step time per iteration, the runs' real wall time, peak memory and training FLOPs relative
    to the student. A record older than schema 4 has no wall time (`record.py`): "—" there."""
    if not records:
        return dict.fromkeys(COST_COLUMNS, "—")
    per_iter = [r.step_time_s / r.iterations for _, r in records if r.iterations and r.step_time_s is not None]
    wall = [r.wall_time_s for _, r in records if r.wall_time_s is not None]
    peak = [r.peak_memory_mb for _, r in records if r.peak_memory_mb is not None]
    ratio = train_flops_ratio(records[0][0].cfg, cache)
    return {"step s/iter": fmt(per_iter, 3) or "—", "wall s": fmt(wall, 0) or "—", "peak MB": fmt(peak, 0) or "—",
            "train FLOPs ×": f"{ratio:.2f}"}


def cost_total_line(plans: list[PlannedRun], cache: CostCache, flops: bool) -> str:
    """The header's total cost of the table's completed runs (each run folder once, teachers and stage runs
    included): device-hours per device kind from the records (`RunCost`), and with `flops` the training
    FLOPs x images (each run's images x its counted FLOPs per image, `engine.cost`)."""
    hours: dict[str, float] = {}
    total_flops, runs, unknown = 0.0, 0, 0
    for plan in {str(p.out): p for p in plans if p.cfg is not None}.values():
        try:
            rec = read_record(plan.out)
        except StorageError:
            continue
        if rec is None or not rec.completed:
            continue
        runs += 1
        cost = cost_of(rec)
        if cost is None:
            unknown += 1
            continue
        hours[cost.device_kind] = hours.get(cost.device_kind, 0.0) + cost.device_hours
        if flops:
            total_flops += cost.train_flops(flops_per_image(plan.cfg, cache))
    if not runs:
        return "Total cost: no completed run yet."
    parts = [f"{h:.4g} {kind}-hours" for kind, h in sorted(hours.items())] or ["device time unknown"]
    if flops:
        parts.append(f"{total_flops:.3g} training FLOPs (FLOPs per image x images trained on)")
    older = f"; {unknown} record(s) older than schema 4 without a wall time left out" if unknown else ""
    return f"Total cost of the table's {runs} completed run(s) (teachers and stage runs included): " + \
        ", ".join(parts) + older + "."
