"""Tables of measured results beside the paper's numbers (pandas -> Markdown and CSV).

Each measured cell is the mean ± std over seeds of the completed runs, next to the paper's number and
the difference (measured mean − paper). A row without a completed run shows its status in the cell
(`skipped`, `missing`, `failed`, `interrupted`, `unreadable`) with the reason in the status column;
never a number. Layouts follow the paper: `long` (one line per method: Tables 2-4) or `wide`
(networks as rows, methods as columns: Table 1). The CSV beside each Markdown file is always long
(one line per row, machine-readable). Params/FLOPs and training cost come from `report/columns.py`.

Significance (`report/stats.py`, docs/tables.md): with two or more seeds each row gets its difference
to its group's Student row with a 95% interval and a p-value (Welch's t-test over seeds); with
`stats`, from the runs' per-image counts, the two-level bootstrap over seeds and test images (two or more
seeds) and the image-only bootstrap (test-set noise only: never starred; one seed suffices). Each
column's name says what its interval covers (`COLUMNS`).

A report never replaces a table that holds measured cells with one that holds fewer (a fresh clone
without the runs, a narrower seed list), unless `force` is given; it says what it kept.

Which checkpoint (`ReportOptions.checkpoint`): `last` (the default) reports each run's final-iteration
metrics. `best` reports each run's periodic evaluation (`eval.every`, the record's `history`) of highest
student mIoU, as CIRKD reports its `best_model`: chosen on the split it is scored on, so optimistically
biased, and the header says so. A best table is its own file (`<table>-<preset>-best.md`); its `--eval-set`
columns come from the evaluation records of `checkpoints/best.pt` (`train.keep_best`); what would mix in
numbers of the last checkpoint (`--stats`, the LaTeX table, forest plot and prediction grid) is refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import numpy as np
import pandas as pd

from sdesbench.engine.inference import Inference
from sdesbench.engine.metrics import miou_convention
from sdesbench.engine.record import RunRecord, Scores, best_evaluation, read_image_counts
from sdesbench.errors import ConfigError, StorageError
from sdesbench.experiments.plan import PlannedRun, Sweep
from sdesbench.experiments.spec import Spec
from sdesbench.io import write_text
from sdesbench.registry import did_you_mean
from sdesbench.report.columns import (COST_COLUMNS, METRIC_LABEL, RECORD_KEY, ExtraEvaluation, SizeColumns,
                                      cost_cells)
from sdesbench.report.numbers import fmt, mean_or_none
from sdesbench.report.stats import BOOTSTRAP_DRAWS, Difference, paired_bootstrap, two_level_bootstrap, welch

MEASURED = re.compile(r"^-?\d+\.\d+( ± \d+\.\d+)?$")  # a measured cell: "m" or "m ± s"
MEASURED_COLUMNS = ("mIoU", "PA", "mAcc", "Ens-T mIoU")
Checkpoint = Literal["last", "best"]
PAPER_METRICS = ("miou", "pa")  # the metrics a spec row holds the paper's numbers of (`spec.Row.paper`)  # the measured metric columns of tables and sweeps
# Predictions that read the ground truth at test time: oracles, not models anyone can deploy. A row reporting one
# (spec `metric:`) carries ORACLE_MARK wherever its number is shown, and the table's header says why.
ORACLE_MARK = "†"
ORACLE_PREDICTIONS = {"ens_t": "SDES's expert ensemble (the paper's Eq. 4), which routes each pixel to an expert by "
                               "its ground-truth class mask"}
ORACLE_NOTE = "{mark} Oracle, not a deployable model: {why}. Compare it with no student as if it were one."
NOT_SAME_SCALE = ("\nThe `{preset}` preset is a sanity check of the pipeline, not a reproduction: its numbers "
                  "are not comparable with the paper's.\n")


def short_status(statuses: list[str]) -> str:
    """The word shown in a cell without a number: the most telling status of its runs."""
    for word in ("failed", "unreadable", "interrupted", "stale", "missing", "skipped"):
        if any(s.startswith(word) for s in statuses):
            return word
    return "missing"


@dataclass
class ReportOptions:
    """What `sdesbench report` adds to the table: significance against the Student row by bootstrap from
    the per-image counts (`stats`), a LaTeX table (`latex`), training curves (`curves`), a forest plot of
    the differences to the Student row (`plot`), a grid of predictions on `qualitative` images of the
    rows `rows` names (default: each group's Student row and its last row, and the teachers); `force`
    replaces a table even when the new one has fewer measured cells."""

    stats: bool = False
    latex: bool = False
    curves: bool = False
    plot: bool = False
    qualitative: int = 0
    rows: tuple[str, ...] = ()  # row labels ("Ours") or keys ("EfficientNet-B0/Ours")
    force: bool = False
    columns: tuple[str, ...] = ()  # the metrics shown (`--columns miou,pa,macc`); () = the spec's `metrics`
    extra: ExtraEvaluation | None = None  # a second evaluation of each run (`--eval-set`), a column per metric
    # a row label (`CIRKD`) or group/label key: every row of a group holding it is compared with it too, as
    # with its Student row (`--against`: "is my method better than CIRKD?")
    against: str | None = None
    checkpoint: Checkpoint = "last"  # which checkpoint's numbers the table reports (module docstring)

    def metrics(self, spec: Spec) -> tuple[str, ...]:
        return tuple(self.columns) or tuple(spec.metrics)


@dataclass
class RowResults:
    """One table row over seeds: the values per metric, the statuses, the completed records."""

    plan: PlannedRun
    runs: list[PlannedRun]
    values: dict[str, list[float]]
    status: list[str] = field(default_factory=list)
    records: list[tuple[PlannedRun, RunRecord]] = field(default_factory=list)
    # metric -> test (`COLUMNS` keys) -> the difference to the group's Student row (in points), None
    # where a side lacks runs; empty on the Student row itself and in a group without one
    differences: dict[str, dict[str, Difference | None]] = field(default_factory=dict)
    is_reference: bool = False
    # the same against the row `ReportOptions.against` names in the row's group (empty without one)
    against_differences: dict[str, dict[str, Difference | None]] = field(default_factory=dict)
    is_against: bool = False

    def status_text(self) -> str:
        parts = sorted(set(self.status))
        text = "; ".join(parts) if parts else "ok"
        if parts and self.records:
            text = f"{len(self.records)} completed; {text}"
        return text


def extra_key(metric: str) -> str:
    """`RowResults.values` key of a metric of the extra evaluation (`ExtraEvaluation`)."""
    return f"extra:{metric}"


def checkpoint_scores(rec: RunRecord, source: str, checkpoint: Checkpoint) -> Scores | None:
    """The record's scores of `source` at the final iteration (`last`) or at its best periodic evaluation (`best`)."""
    if checkpoint == "last":
        return rec.scores(source)
    best = best_evaluation(rec.history)
    return best.scores(source) if best is not None else None


def collect(plans: list[PlannedRun], metrics: tuple[str, ...], extra: ExtraEvaluation | None = None,
            checkpoint: Checkpoint = "last") -> list[RowResults]:
    """One entry per table row (teachers left out), in plan order, with the `checkpoint`'s numbers; with
    `extra`, each metric of the extra evaluation too (values under `extra_key(metric)`)."""
    by_key: dict[str, list[PlannedRun]] = {}
    for p in plans:
        if p.is_row:
            by_key.setdefault(p.key, []).append(p)
    rows = []
    for runs in by_key.values():
        entry = RowResults(runs[0], runs, {m: [] for m in metrics} | ({extra_key(m): [] for m in metrics} if extra else {}))
        for p in runs:
            if p.skipped:
                entry.status.append(f"skipped: {p.skipped}")
                continue
            try:
                rec = p.record()
            except StorageError as e:
                entry.status.append(f"unreadable: {e}")
                continue
            if rec is None and p.stale is not None:  # recorded under other defaults: never shown as current
                entry.status.append(f"{p.stale.describe()}; the old record is kept in {p.stale.folder}")
            elif rec is None:
                entry.status.append("missing: not run yet")
            elif not rec.completed:
                entry.status.append(f"{rec.status}: {rec.error or 'no error recorded'}")
            else:
                entry.records.append((p, rec))
                scores = checkpoint_scores(rec, p.metric_source, checkpoint)
                for m in metrics:
                    v = getattr(scores, RECORD_KEY.get(m, m), None) if scores else None
                    if v is None and checkpoint == "best" and not rec.history:
                        entry.status.append(f"missing: no periodic evaluation (eval.every) in {p.out}/results.json")
                    elif v is None:
                        before = " (recorded before sdesbench recorded mAcc)" if m == "macc" else ""
                        where = " at the best periodic evaluation" if checkpoint == "best" else ""
                        entry.status.append(f"missing: no {p.metric_source} {m}{where} in {p.out}/results.json{before}")
                    else:
                        entry.values[m].append(100.0 * v)
                    if extra is not None:
                        value, why = extra.value(p, rec, m, checkpoint)
                        entry.values[extra_key(m)] += [value] if value is not None else []
                        entry.status += [why] if why else []
        entry.status = list(dict.fromkeys(entry.status))  # one line per reason (the extra's may repeat per metric)
        rows.append(entry)
    return rows


def reference_rows(entries: list[RowResults]) -> dict[str, RowResults]:
    """Each group's Student row: its first row training the plain student and reporting the student."""
    refs: dict[str, RowResults] = {}
    for e in entries:
        if e.plan.method == "student" and e.plan.metric_source == "student":
            refs.setdefault(e.plan.group, e)
    return refs


def named_rows(entries: list[RowResults], name: str) -> dict[str, RowResults]:
    """Each group's row that `name` names: its label (`CIRKD`, in every group that has one) or its key
    (`DeepLabV3-ResNet-18/CIRKD`, that group only)."""
    return {e.plan.group: e for e in entries if name in (e.plan.row, e.plan.key)}


def against_label(name: str) -> str:
    """What the columns comparing with the `--against` row call it: its label."""
    return name.rsplit("/", 1)[-1]


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


def shared_counts(entry: RowResults, ref: RowResults) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """seed -> counts of the row's and of the Student row's runs, those scored on the Student row's images
    (the ids of its first seed with counts); a run scored on other images is left out."""
    mine, theirs = seed_counts(entry, entry.plan.metric_source), seed_counts(ref, ref.plan.metric_source)
    if not theirs:
        return {}, {}
    ids = theirs[min(theirs)][0]
    return ({s: c for s, (i, c) in mine.items() if i == ids}, {s: c for s, (i, c) in theirs.items() if i == ids})


def differences(entry: RowResults, ref: RowResults, metric: str, seeds: bool,
                stats: bool) -> dict[str, Difference | None]:
    """The row's difference to its group's Student row in points, per test: Welch over seeds (`seeds`);
    with `stats`, the two-level bootstrap over all seeds of both rows (`seeds`) and the image-only one
    over the seeds both rows have (seed s of the row against seed s of the Student row)."""
    out: dict[str, Difference | None] = {}
    if seeds:
        out["welch"] = welch(entry.values[metric], ref.values[metric])
    if not stats:
        return out
    mine, theirs = shared_counts(entry, ref)
    if seeds:
        two = two_level_bootstrap(list(mine.values()), list(theirs.values()), metric) if mine and theirs else None
        out["two_level"] = two.scaled(100) if two else None
    both = sorted(s for s in mine if s in theirs)
    image = paired_bootstrap([mine[s] for s in both], [theirs[s] for s in both], metric) if both else None
    out["images"] = image.scaled(100) if image else None
    return out


def compared_with(entry: RowResults, ref: RowResults | None, metrics: tuple[str, ...], seeds: bool,
                  stats: bool) -> tuple[bool, dict[str, dict[str, Difference | None]]]:
    """Whether the row is `ref` itself, and its `differences` to `ref` per metric (none on `ref` itself or
    without one): the Student row's comparison and the `--against` row's are the same computation."""
    if ref is None or ref is entry:
        return ref is entry, {}
    return False, {m: differences(entry, ref, m, seeds, stats) for m in metrics}


# test -> (the interval's column, the p-value's column); `{m}` is the metric's label, `{v}` the row compared
# with: `Student` (each group's Student row) or the `--against` row's label (its p-value columns say it too)
VERSUS_COLUMNS = {"welch": ("vs {v} {m} (seeds: Welch 95% CI)", "Welch p{p} {m}"),
                  "two_level": ("vs {v} {m} (seeds + images: bootstrap 95% CI)", "seeds + images p{p} {m}"),
                  "images": ("vs {v} {m} (test images only: bootstrap 95% CI)", "images only p{p} {m}")}
STUDENT = "Student"


def versus_columns(versus: str = STUDENT) -> dict[str, tuple[str, str]]:
    """`VERSUS_COLUMNS` for the row compared with; the Student row's p-value columns keep their short names."""
    p = "" if versus == STUDENT else f" vs {versus}"
    return {t: (ci.replace("{v}", versus), pv.replace("{p}", p)) for t, (ci, pv) in VERSUS_COLUMNS.items()}


COLUMNS = versus_columns()


def comparison_tests(seeds: bool, stats: bool) -> list[str]:
    """The tests a table shows: Welch with two or more seeds; with `stats` the two-level bootstrap (two
    or more seeds) and the image-only one."""
    return (["welch"] if seeds else []) + ((["two_level"] if seeds else []) + ["images"] if stats else [])


def comparison_cells(entry: RowResults, metrics: tuple[str, ...], tests: list[str],
                     versus: str = STUDENT) -> dict[str, str]:
    """The row's difference to its group's Student row (`entry.differences`), or to the `--against` row
    (`versus` its label: `entry.against_differences`), per metric and test: the interval cell and the p-value
    cell; "ref" on that row itself, "—" where a side lacks runs."""
    against = versus != STUDENT
    diffs, is_ref = (entry.against_differences, entry.is_against) if against else (entry.differences, entry.is_reference)
    out: dict[str, str] = {}
    for m in metrics:
        label = METRIC_LABEL.get(m, m)
        for test in tests:
            diff = diffs.get(m, {}).get(test)
            if is_ref:
                cell, p = "ref", ""
            else:
                cell, p = (diff.cell(), diff.p_cell()) if diff else ("—", "—")
            ci_column, p_column = versus_columns(versus)[test]
            out[ci_column.format(m=label)] = cell
            out[p_column.format(m=label)] = p
    return out


def point_difference(entry: RowResults, ref: RowResults | None, metric: str) -> str:
    """The row's mean minus the reference row's, in points (any number of seeds): "ref" on the reference row,
    "—" without one or without runs on a side."""
    if ref is entry:
        return "ref"
    mine, theirs = (mean_or_none(entry.values[metric]), mean_or_none(ref.values[metric]) if ref else None)
    return f"{mine - theirs:+.2f}" if mine is not None and theirs is not None else "—"


def oracle_label(plan: PlannedRun) -> str:
    """The row's label as a table shows it: marked when the row reports an oracle prediction."""
    return f"{plan.row} {ORACLE_MARK}" if plan.metric_source in ORACLE_PREDICTIONS else plan.row


def oracle_lines(plans: list[PlannedRun]) -> list[str]:
    """One header line per oracle prediction the table's rows report (none for a table without)."""
    sources = dict.fromkeys(p.metric_source for p in plans if p.metric_source in ORACLE_PREDICTIONS)
    return [ORACLE_NOTE.format(mark=ORACLE_MARK, why=ORACLE_PREDICTIONS[s]) for s in sources]


def table_rows(plans: list[PlannedRun], spec: Spec, results: Path, cost: bool = False,
               stats: bool = False, extra: ExtraEvaluation | None = None,
               against: str | None = None, checkpoint: Checkpoint = "last") -> tuple[pd.DataFrame, list[str], list[RowResults]]:
    """`table_frame` plus the rows' results (for the LaTeX table). A table that extends another, or one
    compared `against` a named row, also gets each row's point difference to its group's Student row (and to
    the named row: `Δ Student mIoU`, `Δ CIRKD mIoU`); `against` adds its intervals and p-values too."""
    metrics = tuple(spec.metrics)
    sizes = SizeColumns(spec, results)
    entries = collect(plans, metrics, extra, checkpoint)
    extra_label = extra_column_label(plans, extra)
    with_paper = {m for m in metrics if m in PAPER_METRICS}
    refs = reference_rows(entries)
    named = named_rows(entries, against) if against else {}
    versus = against_label(against) if against else None
    deltas = bool(spec.extends or against)
    several_seeds = max((len(e.runs) for e in entries), default=0) >= 2
    shown = dict.fromkeys(k for e in entries for k in e.plan.show)  # a row without a display column (a row of
    lines = []                                                         # an extension) shows it blank
    for entry in entries:
        plan = entry.plan
        line: dict[str, Any] = {"Network": plan.group, "Method": plan.row, **dict.fromkeys(shown, ""), **plan.show}
        for m in metrics:
            label = METRIC_LABEL.get(m, m)
            vals = entry.values[m]
            paper = plan.paper.get(m)
            line[label] = fmt(vals) or short_status(entry.status)
            if m in with_paper:  # no paper column for a metric no paper gives (mAcc)
                line[f"paper {label}"] = f"{paper:.2f}" if paper is not None else "—"
                line[f"Δ {label}"] = f"{mean_or_none(vals) - paper:+.2f}" if vals and paper is not None else "—"
        if extra is not None:
            for m in metrics:
                line[f"{METRIC_LABEL.get(m, m)} ({extra_label})"] = fmt(entry.values[extra_key(m)]) or \
                    short_status(entry.status)
        ref = refs.get(plan.group)
        entry.is_reference, entry.differences = compared_with(entry, ref, metrics, several_seeds, stats)
        if deltas:
            for m in metrics:
                label = METRIC_LABEL.get(m, m)
                line[f"Δ {STUDENT} {label}"] = point_difference(entry, ref, m)
                if versus:
                    line[f"Δ {versus} {label}"] = point_difference(entry, named.get(plan.group), m)
        line.update(comparison_cells(entry, metrics, comparison_tests(several_seeds, stats)))
        if versus:
            entry.is_against, entry.against_differences = compared_with(entry, named.get(plan.group), metrics,
                                                                        several_seeds, stats)
            line.update(comparison_cells(entry, metrics, comparison_tests(several_seeds, stats), versus))
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


def wide_markdown(df: pd.DataFrame, metric: str, against: str | None = None) -> str:
    """Networks as rows and methods as columns (Table 1): measured, paper and Δ lines per network (and
    the difference to the Student column, and to the `against` row, with its p-values when the table has them)."""
    label = METRIC_LABEL.get(metric, metric)
    methods = list(dict.fromkeys(df["Method"]))
    versus = [STUDENT] + ([against_label(against)] if against else [])
    kinds = [(what, col) for what, col in (("measured", label), ("paper", f"paper {label}"), ("Δ", f"Δ {label}"),
                                           *((f"Δ {v}", f"Δ {v} {label}") for v in versus)) if col in df.columns]
    comparison = {c.format(m=label) for v in versus for pair in versus_columns(v).values() for c in pair}
    kinds += [(c.replace(f" {label} (", " (").replace(f" {label}", ""), c) for c in df.columns if c in comparison]
    lines = []
    for net, part in df.groupby("Network", sort=False):
        cells = {r["Method"]: r for _, r in part.iterrows()}
        for what, col in kinds:
            lines.append({"Network": net if what == "measured" else "", "": what,
                          **{m: cells[m][col] if m in cells else "—" for m in methods}})
    return pd.DataFrame(lines).to_markdown(index=False, disable_numparse=True)


def extra_column_label(plans: list[PlannedRun], extra: ExtraEvaluation | None) -> str:
    """What the extra evaluation's columns are called after their metric: `mIoU (MS+flip)`."""
    cfg = next((p.cfg for p in plans if p.cfg is not None and p.is_row), None)
    return extra.label(cfg) if extra is not None and cfg is not None else ""


def evaluation_lines(plans: list[PlannedRun], extra: ExtraEvaluation | None = None) -> str:
    """Every report's header says how its numbers were evaluated: the inference (whole image or sliding
    windows, scales, flip and the rule merging them) and the mIoU convention, of the table's runs and of the
    extra evaluation's columns."""
    cfgs = [p.cfg for p in plans if p.cfg is not None and p.is_row]
    if not cfgs:
        return ""
    described = {f"{Inference.of(c.eval).describe()}; {miou_convention(c.eval.absent_classes)}" for c in cfgs}
    own = described.pop() if len(described) == 1 else "as each run's eval settings say (they differ)"
    text = f"Evaluation: {own}."
    if extra is not None:
        text += f" Columns `({extra.label(cfgs[0])})`: {extra.describe(cfgs[0])} (`sdesbench eval --record`)."
    return text


def protocol_line(plans: list[PlannedRun]) -> str:
    """The protocol every run of the table shares (dataset, splits, schedule, crop, batch)."""
    protos = [p.protocol for p in plans if p.is_row and p.protocol]
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


COMPARISON_NOTE = ("\n`vs Student ...`: the row minus its group's Student row, in points, with a 95% interval and a "
                   "two-sided p-value; each column's name says what its interval covers (docs/tables.md, "
                   "\"Significance\"). {tests} `*` marks an interval that excludes 0, and only an interval that "
                   "includes the training noise (the seeds) carries one. `ref` is the Student row itself, `—` a side "
                   "without enough runs.\n")
TEST_NOTES = {
    "welch": "`seeds: Welch`: Welch's t-test over the seeds, the test images held fixed (would another training "
             "seed give a different difference?).",
    "two_level": "`seeds + images`: a two-level bootstrap from the per-image counts of the final evaluation "
                 "({draws} seeded draws, each resampling the test images once for both rows and every seed, then "
                 "each row's seeds), interval Δ ± t × its standard error (would another seed and another draw of "
                 "test images give a different difference?).",
    "images": "`test images only`: a paired bootstrap of the test images ({draws} seeded draws) for these exact "
              "trained models, seed s against seed s (would this exact pair of trained models differ on another "
              "draw of test images?): test-set noise only, training noise not included, so never starred.",
}


AGAINST_NOTE = ("\n`Δ {v}` and `vs {v} ...`: the row minus the `{v}` row of its group (`--against {name}`), with "
                "the same tests as against the Student row; `ref` is that row itself, `—` a group without one.\n")
DELTA_NOTE = "\n`Δ Student`: the row's mean minus its group's Student row's, in points.\n"


def comparison_note(df: pd.DataFrame, metrics: tuple[str, ...], against: str | None = None) -> str:
    """The note under a table with `vs Student` (or `Δ Student`) columns: what each of its tests answers, and
    what the `--against` columns compare; "" without any."""
    label = METRIC_LABEL.get(metrics[0], metrics[0])
    tests = [t for t, (ci, _) in COLUMNS.items() if ci.format(m=label) in df.columns]
    note = DELTA_NOTE if f"Δ {STUDENT} {label}" in df.columns else ""
    if tests:
        note += COMPARISON_NOTE.format(tests=" ".join(TEST_NOTES[t].format(draws=BOOTSTRAP_DRAWS) for t in tests))
    if against:
        note += AGAINST_NOTE.format(v=against_label(against), name=against)
    return note


def check_against(spec: Spec, name: str | None) -> None:
    """`--against` names a row of the table, by label or group/label key (one line with a did-you-mean)."""
    if name is None:
        return
    known = {r.label for g in spec.groups for r in g.rows} | {f"{g.name}/{r.label}" for g in spec.groups for r in g.rows}
    if spec.is_sweep or name not in known:
        raise ConfigError(f"--against: {spec.name} has no row {name!r}{did_you_mean(name, known)}")


MIXED = "--checkpoint best: {what} score(s) the last checkpoint; a table mixing the best and the last checkpoint is refused"


def check_checkpoint(options: ReportOptions, spec: Spec | None = None) -> None:
    """One line when the options would mix the last checkpoint's numbers into a table of the best one."""
    if options.checkpoint not in get_args(Checkpoint):
        raise ConfigError(f"--checkpoint: expected last or best, got {options.checkpoint!r}")
    if options.checkpoint == "last":
        return
    mixed = [what for what, on in (("--stats", options.stats),
                                   ("--format latex", options.latex), ("--plot", options.plot),
                                   ("--qualitative", bool(options.qualitative)),
                                   (f"the sweep figure of {spec.name if spec else ''}", bool(spec and spec.is_sweep)))
             if on]
    if mixed:
        raise ConfigError(MIXED.format(what=", ".join(mixed)))


def checkpoint_line(entries: list[RowResults], checkpoint: Checkpoint) -> str:
    """The header's line saying which checkpoint the numbers are of (and, for `best`, how it was chosen)."""
    if checkpoint == "last":
        return ("Checkpoint: **last** (each run's weights at its final iteration; `--checkpoint best` reports the "
                "best periodic evaluation instead).")
    chosen = [(rec.eval_split or p.cfg.data.eval_split, best_evaluation(rec.history))
              for e in entries for p, rec in e.records]
    splits = sorted({s for s, ev in chosen if ev is not None and s}) or \
        sorted({e.plan.cfg.data.eval_split for e in entries if e.plan.cfg is not None})
    images = sorted({ev.images for _, ev in chosen if ev is not None})
    on = f" on {'/'.join(map(str, images))} image(s)" if images else ""
    return (f"Checkpoint: **best**: each run's periodic evaluation (`eval.every`) of highest student mIoU{on}, "
            f"**selected on the `{'/'.join(splits)}` split it is scored on** (CIRKD's practice): optimistically "
            "biased, not a held-out estimate. The default report (`last`) scores the final iteration.")


def write_table(sweep: Sweep, spec: Spec, options: ReportOptions | None = None) -> Written:
    """Write results/<table>-<preset>.md and .csv (unless the existing table holds more measured cells)."""
    options = options or ReportOptions()
    plans = sweep.plans(spec)
    check_against(spec, options.against)
    check_checkpoint(options, spec)
    df, notes, entries = table_rows(plans, spec, sweep.results, cost=spec.cost, stats=options.stats,
                                    extra=options.extra, against=options.against, checkpoint=options.checkpoint)
    units = "/".join(METRIC_LABEL.get(m, m) for m in spec.metrics) + " in %"
    md = (f"# {spec.title}\n\nPreset `{sweep.preset}`, seeds {','.join(map(str, sweep.seeds))}. "
          f"{protocol_line(plans)} {units}, mean ± std over seeds; Δ = measured mean − paper. Cells without a "
          f"number give the run's status (reason in `status`).\n\n{evaluation_lines(plans, options.extra)}\n\n"
          f"{checkpoint_line(entries, options.checkpoint)}\n\n")
    for line in oracle_lines(plans):
        md += line + "\n\n"
    shown = df.assign(Method=[oracle_label(e.plan) for e in entries]) if entries else df  # the CSV keeps the labels
    if spec.extends:
        md += (f"Extends the table `{spec.extends}`: its rows, the same runs as its own table's, beside this spec's "
               "rows, under the same protocol.\n\n")
    if spec.layout == "wide":
        for m in spec.metrics:
            md += wide_markdown(shown, m, options.against) + "\n\n"
        md += "## Status and training cost per row\n\n"
        keep = ["Network", "Method"] + [c for c in (*COST_COLUMNS, "seeds", "status") if c in df.columns]
        md += shown[keep].to_markdown(index=False, disable_numparse=True) + "\n"
    else:
        md += shown.to_markdown(index=False, disable_numparse=True) + "\n"
    md += comparison_note(df, tuple(spec.metrics), options.against)
    if spec.cost:
        md += ("\nTraining cost: `step s/iter` = the training steps' time / iterations (step_time_s: no loader "
               "waits, evaluations, checkpoints or setup); `wall s` = the run's real wall time, all of those "
               "included (wall_time_s, summed over resumes; `—` for a record older than schema 4, which did not "
               "measure it); `peak MB` = the run's peak CUDA memory, or its peak resident set on CPU; `train FLOPs ×` = "
               "FLOPs of one training step (teacher forward, student and method modules forward + backward) over "
               "the plain student's, counted with torch's FlopCounterMode at 64x64.\n")
    for n in notes:
        md += f"\n{n}\n"
    written = write_outputs(sweep, md, df, options.force, suffix="-best" if options.checkpoint == "best" else "")
    written.df, written.entries = df, entries
    return written


def measured_cells(df: pd.DataFrame) -> int:
    """How many measured numbers a table holds (its metric cells that are a number, not a status; an extra
    evaluation's `mIoU (MS+flip)` columns included)."""
    columns = [c for c in df.columns if c in MEASURED_COLUMNS or (str(c).split(" (")[0] in MEASURED_COLUMNS
                                                                   and str(c).endswith(")"))]
    return sum(bool(MEASURED.match(str(v))) for c in columns for v in df[c])


def existing_measured_cells(csv_path: Path) -> int:
    if not csv_path.is_file():
        return 0
    try:
        return measured_cells(pd.read_csv(csv_path, dtype=str, keep_default_na=False))
    except (OSError, ValueError, UnicodeDecodeError):  # an unreadable table protects nothing
        return 0


def write_outputs(sweep: Sweep, md: str, df: pd.DataFrame, force: bool = False,
                  extra: list[tuple[Path, Callable[[Path], None]]] = (), suffix: str = "") -> Written:
    """results/<table>-<preset><suffix>.md (with the not-a-reproduction note off the paper preset), .csv and the
    `extra` files (path, writer) that go with them; all kept as they are when the existing table holds
    more measured cells than the new one, unless `force`."""
    if sweep.preset != "paper":
        md += NOT_SAME_SCALE.format(preset=sweep.preset)
    md_path = Path(sweep.results) / f"{sweep.name}-{sweep.preset}{suffix}.md"
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
