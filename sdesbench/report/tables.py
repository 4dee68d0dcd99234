"""Tables of measured results beside the paper's numbers (pandas -> Markdown and CSV).

Each measured cell is the mean ± std over seeds of the completed runs, next to the paper's number and
the difference (measured mean − paper). A row without a completed run shows its status in the cell
(`skipped`, `missing`, `failed`, `interrupted`, `unreadable`) with the reason in the status column;
never a number. Layouts follow the paper: `long` (one line per method: Tables 2-4) or `wide`
(networks as rows, methods as columns: Table 1). The CSV beside each Markdown file is always long
(one line per row, machine-readable). Params/FLOPs and training cost come from `report/columns.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sdesbench.engine.record import RunRecord
from sdesbench.errors import StorageError
from sdesbench.experiments.plan import PlannedRun, Sweep
from sdesbench.experiments.spec import Spec
from sdesbench.io import write_text
from sdesbench.report.columns import SizeColumns, cost_cells
from sdesbench.report.numbers import fmt, mean_or_none

METRIC_LABEL = {"miou": "mIoU", "pa": "PA"}
RECORD_KEY = {"miou": "miou", "pa": "pixel_acc"}  # paper metric -> Scores field
NOT_SAME_SCALE = ("\nThe `{preset}` preset is a sanity check of the pipeline, not a reproduction: its numbers "
                  "are not comparable with the paper's.\n")


def short_status(statuses: list[str]) -> str:
    """The word shown in a cell without a number: the most telling status of its runs."""
    for word in ("failed", "unreadable", "interrupted", "missing", "skipped"):
        if any(s.startswith(word) for s in statuses):
            return word
    return "missing"


@dataclass
class RowResults:
    """One table row over seeds: the values per metric, the statuses, the completed records."""

    plan: PlannedRun
    runs: list[PlannedRun]
    values: dict[str, list[float]]
    status: list[str] = field(default_factory=list)
    records: list[tuple[PlannedRun, RunRecord]] = field(default_factory=list)

    def status_text(self) -> str:
        parts = sorted(set(self.status))
        text = "; ".join(parts) if parts else "ok"
        if parts and self.records:
            text = f"{len(self.records)} completed; {text}"
        return text


def collect(plans: list[PlannedRun], metrics: tuple[str, ...]) -> list[RowResults]:
    """One entry per table row (teachers left out), in plan order."""
    by_key: dict[str, list[PlannedRun]] = {}
    for p in plans:
        if not p.is_teacher:
            by_key.setdefault(p.key, []).append(p)
    rows = []
    for runs in by_key.values():
        entry = RowResults(runs[0], runs, {m: [] for m in metrics})
        for p in runs:
            if p.skipped:
                entry.status.append(f"skipped: {p.skipped}")
                continue
            try:
                rec = p.record()
            except StorageError as e:
                entry.status.append(f"unreadable: {e}")
                continue
            if rec is None:
                entry.status.append("missing: not run yet")
            elif not rec.completed:
                entry.status.append(f"{rec.status}: {rec.error or 'no error recorded'}")
            else:
                entry.records.append((p, rec))
                scores = rec.scores(p.metric_source)
                for m in metrics:
                    v = getattr(scores, RECORD_KEY.get(m, m), None) if scores else None
                    if v is None:
                        entry.status.append(f"missing: no {p.metric_source} {m} in {p.out}/results.json")
                    else:
                        entry.values[m].append(100.0 * v)
        rows.append(entry)
    return rows


def table_frame(plans: list[PlannedRun], spec: Spec, results: Path, cost: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Long table: one line per row with measured, paper and Δ per metric (+ sizes, cost, status)."""
    metrics = tuple(spec.metrics)
    sizes = SizeColumns(spec, results)
    lines = []
    for entry in collect(plans, metrics):
        plan = entry.plan
        line: dict[str, Any] = {"Network": plan.group, "Method": plan.row, **plan.show}
        for m in metrics:
            label = METRIC_LABEL.get(m, m)
            vals = entry.values[m]
            paper = plan.paper.get(m)
            line[label] = fmt(vals) or short_status(entry.status)
            line[f"paper {label}"] = f"{paper:.2f}" if paper is not None else "—"
            line[f"Δ {label}"] = f"{mean_or_none(vals) - paper:+.2f}" if vals and paper is not None else "—"
        line.update(sizes.cells(plan))
        if cost:
            line.update(cost_cells(entry.records, sizes.cache))
        line["seeds"] = len(entry.values[metrics[0]])
        line["status"] = entry.status_text()
        lines.append(line)
    sizes.cache.save()
    return pd.DataFrame(lines), sorted(sizes.notes)


def wide_markdown(df: pd.DataFrame, metric: str) -> str:
    """Networks as rows and methods as columns (Table 1): measured, paper and Δ lines per network."""
    label = METRIC_LABEL.get(metric, metric)
    methods = list(dict.fromkeys(df["Method"]))
    lines = []
    for net, part in df.groupby("Network", sort=False):
        cells = {r["Method"]: r for _, r in part.iterrows()}
        for what, col in (("measured", label), ("paper", f"paper {label}"), ("Δ", f"Δ {label}")):
            lines.append({"Network": net if what == "measured" else "", "": what,
                          **{m: cells[m][col] if m in cells else "—" for m in methods}})
    return pd.DataFrame(lines).to_markdown(index=False, disable_numparse=True)


def protocol_line(plans: list[PlannedRun]) -> str:
    """The protocol every run of the table shares (dataset, splits, schedule, crop, batch)."""
    protos = [p.protocol for p in plans if not p.is_teacher and p.protocol]
    if not protos:
        return ""
    first = protos[0]
    keys = ("dataset", "train_split", "eval_split", "iters", "crop", "batch", "lr")
    shared = {k: first.get(k) for k in keys if all(p.get(k) == first.get(k) for p in protos)}
    text = {"dataset": "dataset {}", "train_split": "trained on `{}`", "eval_split": "evaluated on `{}`",
            "iters": "{} iterations", "crop": "crop {}", "batch": "batch {}", "lr": "lr {}"}
    parts = [text[k].format("x".join(map(str, v)) if isinstance(v, list) else v) for k, v in shared.items()]
    return "Protocol: " + ", ".join(parts) + "." if parts else ""


def write_table(sweep: Sweep, spec: Spec) -> tuple[Path, str]:
    """Write results/<table>-<preset>.md and .csv; return the Markdown path and text."""
    plans = sweep.plans(spec)
    df, notes = table_frame(plans, spec, sweep.results, cost=spec.cost)
    units = "mIoU/PA in %" if "pa" in spec.metrics else "mIoU in %"
    md = (f"# {spec.title}\n\nPreset `{sweep.preset}`, seeds {','.join(map(str, sweep.seeds))}. "
          f"{protocol_line(plans)} {units}, mean ± std over seeds; Δ = measured mean − paper. Cells without a "
          "number give the run's status (reason in `status`).\n\n")
    if spec.layout == "wide":
        for m in spec.metrics:
            md += wide_markdown(df, m) + "\n\n"
        md += "## Status and training cost per row\n\n"
        keep = ["Network", "Method"] + [c for c in ("s/iter", "peak MB", "train FLOPs ×", "seeds", "status")
                                        if c in df.columns]
        md += df[keep].to_markdown(index=False, disable_numparse=True) + "\n"
    else:
        md += df.to_markdown(index=False, disable_numparse=True) + "\n"
    if spec.cost:
        md += ("\nTraining cost: `s/iter` = wall_time_s / iterations; `peak MB` = peak CUDA memory, or the "
               "process's max RSS on CPU; `train FLOPs ×` = FLOPs of one training step (teacher forward, student "
               "and method modules forward + backward) over the plain student's, counted with torch's "
               "FlopCounterMode at 64x64.\n")
    for n in notes:
        md += f"\n{n}\n"
    return write_outputs(sweep, md, df)


def write_outputs(sweep: Sweep, md: str, df: pd.DataFrame) -> tuple[Path, str]:
    """results/<table>-<preset>.md (with the not-a-reproduction note off the paper preset) and .csv."""
    if sweep.preset != "paper":
        md += NOT_SAME_SCALE.format(preset=sweep.preset)
    md_path = Path(sweep.results) / f"{sweep.table}-{sweep.preset}.md"
    write_text(md_path, md)
    write_text(md_path.with_suffix(".csv"), df.to_csv(index=False))
    return md_path, md
