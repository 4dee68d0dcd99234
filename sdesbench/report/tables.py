"""Tables of measured results beside the paper's numbers (pandas -> Markdown and CSV).

Each measured cell is the mean ± std over seeds of the completed runs, next to the paper's number and
the difference (measured mean − paper). A row without a completed run shows its status in the cell
(`skipped`, `missing`, `failed`, `interrupted`, `unreadable`) with the reason in the status column;
never a number. Layouts follow the paper: `long` (one line per method: Tables 2-4) or `wide`
(networks as rows, methods as columns: Table 1). The CSV beside each Markdown file is always long
(one line per row, machine-readable). Params/FLOPs and training cost come from `report/columns.py`.

Significance (`report/stats.py`, docs/tables.md): with two or more seeds each row gets its difference
to its group's Student row with a 95% interval and a p-value (Welch's t-test over seeds); with
`stats`, a per-image paired bootstrap from the runs' per-image counts as well (one seed suffices).

A report never replaces a table that holds measured cells with one that holds fewer (a fresh clone
without the runs, a narrower seed list), unless `force` is given; it says what it kept.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from sdesbench.engine.record import RunRecord, read_image_counts
from sdesbench.errors import StorageError
from sdesbench.experiments.plan import PlannedRun, Sweep
from sdesbench.experiments.spec import Spec
from sdesbench.io import write_text
from sdesbench.report.columns import SizeColumns, cost_cells
from sdesbench.report.numbers import fmt, mean_or_none
from sdesbench.report.stats import BOOTSTRAP_DRAWS, Difference, paired_bootstrap, welch

METRIC_LABEL = {"miou": "mIoU", "pa": "PA"}
RECORD_KEY = {"miou": "miou", "pa": "pixel_acc"}  # paper metric -> Scores field
MEASURED = re.compile(r"^-?\d+\.\d+( ± \d+\.\d+)?$")  # a measured cell: "m" or "m ± s"
MEASURED_COLUMNS = ("mIoU", "PA", "Ens-T mIoU")  # the measured metric columns of tables and sweeps
NOT_SAME_SCALE = ("\nThe `{preset}` preset is a sanity check of the pipeline, not a reproduction: its numbers "
                  "are not comparable with the paper's.\n")


def short_status(statuses: list[str]) -> str:
    """The word shown in a cell without a number: the most telling status of its runs."""
    for word in ("failed", "unreadable", "interrupted", "missing", "skipped"):
        if any(s.startswith(word) for s in statuses):
            return word
    return "missing"


@dataclass
class ReportOptions:
    """What `sdesbench report` adds to the table: significance against the Student row by per-image
    bootstrap (`stats`), a LaTeX table (`latex`), training curves (`curves`), a grid of predictions
    on `qualitative` images; `force` replaces a table even when the new one has fewer measured cells."""

    stats: bool = False
    latex: bool = False
    curves: bool = False
    qualitative: int = 0
    force: bool = False


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


def reference_rows(entries: list[RowResults]) -> dict[str, RowResults]:
    """Each group's Student row: its first row training the plain student and reporting the student."""
    refs: dict[str, RowResults] = {}
    for e in entries:
        if e.plan.method == "student" and e.plan.metric_source == "student":
            refs.setdefault(e.plan.group, e)
    return refs


def seed_counts(entry: RowResults, source: str) -> dict[int, tuple[list[str], np.ndarray]]:
    """seed -> (image ids, images x 3 x C counts of prediction `source`) of the row's completed runs."""
    out = {}
    for plan, rec in entry.records:
        try:
            counts = read_image_counts(plan.out, rec)
        except StorageError:
            continue
        if counts is not None and source in counts.counts:
            out[plan.seed] = (counts.image_ids, counts.counts[source])
    return out


def bootstrap_cells(entry: RowResults, ref: RowResults, metric: str) -> tuple[str, str]:
    """The per-image paired bootstrap of `entry` against `ref` over the seeds both have on the same images."""
    mine, theirs = seed_counts(entry, entry.plan.metric_source), seed_counts(ref, "student")
    seeds = sorted(s for s in mine if s in theirs and mine[s][0] == theirs[s][0])
    if not seeds:
        return "—", "—"
    diff = paired_bootstrap([mine[s][1] for s in seeds], [theirs[s][1] for s in seeds], metric)
    scaled = Difference(100 * diff.delta, 100 * diff.low, 100 * diff.high, diff.p)
    return scaled.cell(), scaled.p_cell()


def comparison_cells(entry: RowResults, ref: RowResults | None, metrics: tuple[str, ...], seeds: bool,
                     stats: bool) -> dict[str, str]:
    """The row's difference to its group's Student row, per metric: Welch over seeds (`seeds`) and the
    per-image bootstrap (`stats`); "ref" on the Student row itself, "—" where a side lacks runs."""
    out: dict[str, str] = {}
    for m in metrics:
        label = METRIC_LABEL.get(m, m)
        tests = ([("95% CI", "p")] if seeds else []) + ([("bootstrap 95% CI", "bootstrap p")] if stats else [])
        for kind, p_kind in tests:
            if ref is None or ref is entry:
                cell, p = ("ref", "") if ref is entry else ("—", "—")
            elif kind == "95% CI":
                diff = welch(entry.values[m], ref.values[m])
                cell, p = (diff.cell(), diff.p_cell()) if diff else ("—", "—")
            else:
                cell, p = bootstrap_cells(entry, ref, m)
            out[f"vs Student {label} ({kind})"] = cell
            out[f"{p_kind} {label}"] = p
    return out


def table_rows(plans: list[PlannedRun], spec: Spec, results: Path, cost: bool = False,
               stats: bool = False) -> tuple[pd.DataFrame, list[str], list[RowResults]]:
    """`table_frame` plus the rows' results (for the LaTeX table)."""
    metrics = tuple(spec.metrics)
    sizes = SizeColumns(spec, results)
    entries = collect(plans, metrics)
    refs = reference_rows(entries)
    several_seeds = max((len(e.runs) for e in entries), default=0) >= 2
    lines = []
    for entry in entries:
        plan = entry.plan
        line: dict[str, Any] = {"Network": plan.group, "Method": plan.row, **plan.show}
        for m in metrics:
            label = METRIC_LABEL.get(m, m)
            vals = entry.values[m]
            paper = plan.paper.get(m)
            line[label] = fmt(vals) or short_status(entry.status)
            line[f"paper {label}"] = f"{paper:.2f}" if paper is not None else "—"
            line[f"Δ {label}"] = f"{mean_or_none(vals) - paper:+.2f}" if vals and paper is not None else "—"
        line.update(comparison_cells(entry, refs.get(plan.group), metrics, several_seeds, stats))
        line.update(sizes.cells(plan))
        if cost:
            line.update(cost_cells(entry.records, sizes.cache))
        line["seeds"] = len(entry.values[metrics[0]])
        line["status"] = entry.status_text()
        lines.append(line)
    sizes.cache.save()
    return pd.DataFrame(lines), sorted(sizes.notes), entries


def table_frame(plans: list[PlannedRun], spec: Spec, results: Path, cost: bool = False,
                stats: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Long table: one line per row with measured, paper and Δ per metric (+ the difference to the
    group's Student row, sizes, cost, status)."""
    df, notes, _ = table_rows(plans, spec, results, cost, stats)
    return df, notes


def wide_markdown(df: pd.DataFrame, metric: str) -> str:
    """Networks as rows and methods as columns (Table 1): measured, paper and Δ lines per network (and
    the difference to the Student column with its p-values when the table has them)."""
    label = METRIC_LABEL.get(metric, metric)
    methods = list(dict.fromkeys(df["Method"]))
    kinds = [("measured", label), ("paper", f"paper {label}"), ("Δ", f"Δ {label}")]
    kinds += [(c.replace(f" {label} (", " ("), c) for c in df.columns
              if c.startswith(f"vs Student {label} (") or c in (f"p {label}", f"bootstrap p {label}")]
    lines = []
    for net, part in df.groupby("Network", sort=False):
        cells = {r["Method"]: r for _, r in part.iterrows()}
        for what, col in kinds:
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


@dataclass
class Written:
    """What a report wrote: the Markdown (path and text), every file written, and the line saying
    what was kept instead when the existing table holds more measured cells (nothing written then)."""

    md_path: Path
    md: str
    files: list[Path] = field(default_factory=list)
    kept: str | None = None
    notes: list[str] = field(default_factory=list)  # what was asked for and could not be made, and why
    df: pd.DataFrame | None = None
    entries: list[RowResults] = field(default_factory=list)


COMPARISON_NOTE = ("\n`vs Student ... (95% CI)`: difference of the row's mean to its group's Student row over seeds, "
                   "with the 95% confidence interval and the two-sided p-value of Welch's t-test{boot}; `*` marks an "
                   "interval that excludes 0 (docs/tables.md). `ref` is the Student row itself, `—` a side without "
                   "enough runs.\n")
BOOTSTRAP_NOTE = (" and of a per-image paired bootstrap (the test images resampled {draws} times, seeded; "
                  "mIoU from the summed per-image counts of the final evaluation)")


def write_table(sweep: Sweep, spec: Spec, options: ReportOptions | None = None) -> Written:
    """Write results/<table>-<preset>.md and .csv (unless the existing table holds more measured cells)."""
    options = options or ReportOptions()
    plans = sweep.plans(spec)
    df, notes, entries = table_rows(plans, spec, sweep.results, cost=spec.cost, stats=options.stats)
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
    if any(c.startswith("vs Student") for c in df.columns):
        boot = BOOTSTRAP_NOTE.format(draws=BOOTSTRAP_DRAWS) if options.stats else ""
        md += COMPARISON_NOTE.format(boot=boot)
    if spec.cost:
        md += ("\nTraining cost: `s/iter` = wall_time_s / iterations; `peak MB` = peak CUDA memory, or the "
               "process's max RSS on CPU; `train FLOPs ×` = FLOPs of one training step (teacher forward, student "
               "and method modules forward + backward) over the plain student's, counted with torch's "
               "FlopCounterMode at 64x64.\n")
    for n in notes:
        md += f"\n{n}\n"
    written = write_outputs(sweep, md, df, options.force)
    written.df, written.entries = df, entries
    return written


def measured_cells(df: pd.DataFrame) -> int:
    """How many measured numbers a table holds (its metric cells that are a number, not a status)."""
    return sum(bool(MEASURED.match(str(v))) for c in MEASURED_COLUMNS if c in df.columns for v in df[c])


def existing_measured_cells(csv_path: Path) -> int:
    if not csv_path.is_file():
        return 0
    try:
        return measured_cells(pd.read_csv(csv_path, dtype=str, keep_default_na=False))
    except (OSError, ValueError, UnicodeDecodeError):  # an unreadable table protects nothing
        return 0


def write_outputs(sweep: Sweep, md: str, df: pd.DataFrame, force: bool = False,
                  extra: list[tuple[Path, Callable[[Path], None]]] = ()) -> Written:
    """results/<table>-<preset>.md (with the not-a-reproduction note off the paper preset), .csv and the
    `extra` files (path, writer) that go with them; all kept as they are when the existing table holds
    more measured cells than the new one, unless `force`."""
    if sweep.preset != "paper":
        md += NOT_SAME_SCALE.format(preset=sweep.preset)
    md_path = Path(sweep.results) / f"{sweep.table}-{sweep.preset}.md"
    csv_path = md_path.with_suffix(".csv")
    old, new = existing_measured_cells(csv_path), measured_cells(df)
    if new < old and not force:
        return Written(md_path, md, kept=f"kept {md_path}: it holds {old} measured cell(s), the new table {new} "
                                         "(its runs are not here); --force replaces it")
    write_text(md_path, md)
    write_text(csv_path, df.to_csv(index=False))
    for path, write in extra:
        write(path)
    return Written(md_path, md, [md_path, csv_path] + [p for p, _ in extra])
