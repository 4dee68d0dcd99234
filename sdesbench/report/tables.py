"""Tables of measured results beside the paper's numbers (pandas -> Markdown and CSV).

Each measured cell is the mean ± std over seeds of the completed runs, next to the paper's number and
the difference (measured mean − paper). A row without a completed run shows its status in the cell
(`skipped`, `missing`, `failed`, `interrupted`, `unreadable`) with the reason in the status column;
never a number. Layouts follow the paper: `long` (one line per method: Tables 2-4) or `wide`
(networks as rows, methods as columns: Table 1). The CSV beside each Markdown file is always long
(one line per row, machine-readable). Params/FLOPs and training cost come from `report/columns.py`.

Gains (`report/gains.py`, which computes every comparison; this module only prints them): each row's gain
over its group's Student row, claimed by the paper (`paper Δ Student`) and measured (`Δ Student`); with two or
more seeds its 95% interval and p-value (Welch's t-test over seeds) and the verdict on the claim; with
`stats`, from the runs' per-image counts, the two-level bootstrap over seeds and test images (two or more
seeds) and the image-only bootstrap (test-set noise only: never starred; one seed suffices). Each
column's name says what its interval covers (`COLUMNS`). The header states the verdicts' rules and, per
group, how far our Student row lies from the paper's.

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
from typing import Any, Callable, get_args

import pandas as pd

from sdesbench.engine.cost import CostCache
from sdesbench.engine.inference import Inference
from sdesbench.engine.metrics import miou_convention
from sdesbench.engine.record import best_evaluation
from sdesbench.errors import ConfigError
from sdesbench.experiments.plan import PlannedRun, Sweep
from sdesbench.experiments.spec import Spec
from sdesbench.io import write_text
from sdesbench.registry import did_you_mean
from sdesbench.report.columns import (COST_COLUMNS, METRIC_LABEL, ExtraEvaluation, SizeColumns, cost_cells,
                                      cost_total_line)
from sdesbench.report.gains import STUDENT, VERDICTS, Comparison, Gains, against_label, compare, other_split

EQUAL_COMPUTE = "Student (equal compute)"  # what the columns comparing with the compute-matched Student call it
from sdesbench.report.numbers import fmt, mean_or_none
from sdesbench.report.rows import Checkpoint, RowResults, collect, extra_key
from sdesbench.report.stats import BOOTSTRAP_DRAWS

MEASURED = re.compile(r"^-?\d+\.\d+( ± \d+\.\d+)?$")  # a measured cell: "m" or "m ± s"
MEASURED_COLUMNS = ("mIoU", "PA", "mAcc", "mDice", "mFscore", "Ens-T mIoU")  # the measured metric columns
PAPER_METRICS = ("miou", "pa")  # the metrics a spec row holds the paper's numbers of (`spec.Row.paper`)
# Predictions that read the ground truth at test time: oracles, not models anyone can deploy. A row reporting one
# (spec `metric:`) carries ORACLE_MARK wherever its number is shown, and the table's header says why.
ORACLE_MARK = "†"
ORACLE_PREDICTIONS = {"ens_t": "SDES's expert ensemble (the paper's Eq. 4), which routes each pixel to an expert by "
                               "its ground-truth class mask"}
ORACLE_NOTE = "{mark} Oracle, not a deployable model: {why}. Compare it with no student as if it were one."
# the same in a figure's note, where the mark stands beside a line or an interval
ORACLE_FIGURE_NOTE = "{mark} oracle, not a deployable model: pixels routed to experts by their ground-truth class"
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


# test -> (the interval's column, the p-value's column); `{m}` is the metric's label, `{v}` the row compared
# with: `Student` (each group's Student row) or the `--against` row's label (its p-value columns say it too)
VERSUS_COLUMNS = {"welch": ("vs {v} {m} (seeds: Welch 95% CI)", "Welch p{p} {m}"),
                  "two_level": ("vs {v} {m} (seeds + images: bootstrap 95% CI)", "seeds + images p{p} {m}"),
                  "images": ("vs {v} {m} (test images only: bootstrap 95% CI)", "images only p{p} {m}")}


def versus_columns(versus: str = STUDENT) -> dict[str, tuple[str, str]]:
    """`VERSUS_COLUMNS` for the row compared with; the Student row's p-value columns keep their short names."""
    p = "" if versus == STUDENT else f" vs {versus}"
    return {t: (ci.replace("{v}", versus), pv.replace("{p}", p)) for t, (ci, pv) in VERSUS_COLUMNS.items()}


COLUMNS = versus_columns()


def signed(value: float | None) -> str:
    return f"{value:+.2f}" if value is not None else "—"


def gain_cells(comparison: Comparison, metrics: tuple[str, ...], tests: list[str], versus: str = STUDENT,
               claims: tuple[str, ...] = ()) -> dict[str, str]:
    """A row's comparison (`report/gains.py`) as cells, per metric: the claimed gain (`paper Δ Student`, for the
    metrics in `claims`), the measured one (`Δ Student`), per test its interval and p-value, and with Welch
    (for `claims` too) the verdict; "ref" on the row compared with itself, "—" where a side lacks runs."""
    out: dict[str, str] = {}
    for m in metrics:
        label = METRIC_LABEL.get(m, m)
        g = comparison.gains.get(m)
        ref = comparison.is_reference
        if m in claims:
            out[f"paper Δ {versus} {label}"] = "ref" if ref else signed(g.claimed if g else None)
        out[f"Δ {versus} {label}"] = "ref" if ref else signed(g.measured if g else None)
        for test in tests:
            diff = g.tests.get(test) if g else None
            cell, p = ("ref", "") if ref else (diff.cell(), diff.p_cell()) if diff else ("—", "—")
            ci_column, p_column = versus_columns(versus)[test]
            out[ci_column.format(m=label)] = cell
            out[p_column.format(m=label)] = p
            if test == "welch" and m in claims:
                out[f"verdict {label}"] = "" if ref else (g.verdict if g and g.verdict else "—")
    return out


def oracle_label(plan: PlannedRun) -> str:
    """The row's label as a table shows it: marked when the row reports an oracle prediction."""
    return f"{plan.row} {ORACLE_MARK}" if plan.metric_source in ORACLE_PREDICTIONS else plan.row


def oracle_lines(plans: list[PlannedRun]) -> list[str]:
    """One header line per oracle prediction the table's rows report (none for a table without)."""
    sources = dict.fromkeys(p.metric_source for p in plans if p.metric_source in ORACLE_PREDICTIONS)
    return [ORACLE_NOTE.format(mark=ORACLE_MARK, why=ORACLE_PREDICTIONS[s]) for s in sources]


def table_rows(plans: list[PlannedRun], spec: Spec, results: Path, cost: bool = False,
               stats: bool = False, extra: ExtraEvaluation | None = None,
               against: str | None = None, checkpoint: Checkpoint = "last",
               ) -> tuple[pd.DataFrame, list[str], list[RowResults], Gains]:
    """`table_frame` plus the rows' results and their gains (for the LaTeX table and the forest plot). In a table
    with a Student row, each row's gain over it, claimed and measured (`paper Δ Student mIoU`, `Δ Student mIoU`),
    with its tests and verdict; `against` adds the measured difference to the named row, with its tests too."""
    metrics = tuple(spec.metrics)
    sizes = SizeColumns(spec, results)
    entries = collect(plans, metrics, extra, checkpoint)
    gains = compare(entries, metrics, stats, against)
    extra_label = extra_column_label(plans, extra)
    with_paper = tuple(m for m in metrics if m in PAPER_METRICS)
    versus = against_label(against) if against else None
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
                split = other_split(entry)  # a number on another split is shown, never differenced (header)
                line[f"paper {label}"] = "—" if paper is None else f"{paper:.2f} ({split.paper_split})" if split \
                    else f"{paper:.2f}"
                line[f"Δ {label}"] = f"{mean_or_none(vals) - paper:+.2f}" if vals and paper is not None and not split \
                    else "—"
        if extra is not None:
            for m in metrics:
                line[f"{METRIC_LABEL.get(m, m)} ({extra_label})"] = fmt(entry.values[extra_key(m)]) or \
                    short_status(entry.status)
        if gains.has_student:
            line.update(gain_cells(gains.of(entry), metrics, gains.tests, claims=with_paper))
        if versus:
            line.update(gain_cells(gains.of(entry, against=True), metrics, gains.tests, versus))
        if gains.compute_matched:
            line.update(gain_cells(gains.of(entry, matched=True), metrics, gains.tests, EQUAL_COMPUTE))
        line.update(sizes.cells(plan))
        if cost:
            line.update(cost_cells(entry.records, sizes.cache))
        line["seeds"] = len(entry.values[metrics[0]])
        line["status"] = entry.status_text()
        lines.append(line)
    sizes.cache.save()
    return pd.DataFrame(lines), sorted(sizes.notes), entries, gains


def table_frame(plans: list[PlannedRun], spec: Spec, results: Path, cost: bool = False,
                stats: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Long table: one line per row with measured, paper and Δ per metric (+ the difference to the
    group's Student row, sizes, cost, status)."""
    df, notes, _, _ = table_rows(plans, spec, results, cost, stats)
    return df, notes


def wide_markdown(df: pd.DataFrame, metric: str, against: str | None = None, matched: bool = False) -> str:
    """Networks as rows and methods as columns (Table 1): measured, paper and Δ lines per network (and the gain
    over the Student column, claimed and measured, and the difference to the `against` row, with the intervals,
    p-values and verdicts when the table has them)."""
    label = METRIC_LABEL.get(metric, metric)
    methods = list(dict.fromkeys(df["Method"]))
    versus = [STUDENT] + ([against_label(against)] if against else []) + ([EQUAL_COMPUTE] if matched else [])
    kinds = [(what, col) for what, col in (("measured", label), ("paper", f"paper {label}"), ("Δ", f"Δ {label}"),
                                           (f"paper Δ {STUDENT}", f"paper Δ {STUDENT} {label}"),
                                           *((f"Δ {v}", f"Δ {v} {label}") for v in versus)) if col in df.columns]
    comparison = {c.format(m=label) for v in versus for pair in versus_columns(v).values() for c in pair}
    comparison.add(f"verdict {label}")
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
    gains: Gains | None = None


GAINS_LINE = ("Gains over each group's Student row, in points: `paper Δ Student` = the paper's row − the paper's "
              "Student row (the gain the paper claims); `Δ Student` = our row's mean − our Student row's (the gain "
              "measured).")
VERDICT_LINE = ("`verdict`, from the measured gain's Welch 95% interval over seeds (CI; both rows with 2+ seeds and "
                "the paper's numbers for both, `—` otherwise): {rules}.")
BASELINE_LINE = ("Each group's Student row (the plain student every gain is measured from), ours against the paper's: "
                 "a baseline above the paper's shrinks every gain measured from it.")


def other_split_lines(entries: list[RowResults]) -> str:
    """A header line per row whose paper numbers are on another split than the table's (`Row.paper_split`)."""
    lines = []
    for entry in entries:
        row = other_split(entry)
        if row is None:
            continue
        own = f" over its own Student's {row.paper_student_miou:.2f} there" if row.paper_student_miou is not None else ""
        lines.append(f"- {entry.plan.group} / {entry.plan.row}: the paper's number is on the **{row.paper_split}** "
                     f"split, not on this table's: shown as `(<split>)`, not differenced with our measurement (`Δ` is "
                     f"`—`); its claimed gain is{own or ' not given'}.\n")
    return "Rows whose paper numbers are on another split:\n\n" + "".join(lines) + "\n" if lines else ""


def gains_lines(gains: Gains, metrics: tuple[str, ...]) -> str:
    """The header's part on gains: what the gain columns hold, every verdict's rule (when the table has
    verdicts), and per group how far our Student row lies from the paper's (the first thing to read)."""
    if not gains.has_student:
        return ""
    text = GAINS_LINE
    if gains.verdicts:
        text += " " + VERDICT_LINE.format(rules="; ".join(f"`{v}`: {rule}" for v, rule in VERDICTS.items()))
    claimed = [m for m in metrics if m in PAPER_METRICS] or list(metrics[:1])
    text += "\n\n" + BASELINE_LINE + "\n\n"
    for group, base in gains.baselines.items():
        said = "; ".join(base.sentence(m, METRIC_LABEL.get(m, m)) for m in claimed)
        text += f"- {group}: {said}.\n"
    return text + "\n"


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


EQUAL_COMPUTE_NOTE = ("\n`Δ {v}` and `vs {v} ...` (`--compute-matched {by}`): the row minus the Student of its group "
                      "trained for as long as the row costs (its cost class: the row's training cost over the "
                      "Student's, rounded to 5%; the rows `Student (compute ×c)`), with the same tests as against "
                      "the Student row; the plain Student row where the class is 1.00.\n")


def comparison_note(df: pd.DataFrame, metrics: tuple[str, ...], against: str | None = None) -> str:
    """The note under a table with `vs Student` columns: what each of its tests answers, and what the `--against`
    columns compare; "" without any."""
    label = METRIC_LABEL.get(metrics[0], metrics[0])
    tests = [t for t, (ci, _) in COLUMNS.items() if ci.format(m=label) in df.columns]
    note = ""
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
    df, notes, entries, gains = table_rows(plans, spec, sweep.results, cost=spec.cost, stats=options.stats,
                                    extra=options.extra, against=options.against, checkpoint=options.checkpoint)
    units = "/".join(METRIC_LABEL.get(m, m) for m in spec.metrics) + " in %"
    md = (f"# {spec.title}\n\nPreset `{sweep.preset}`, seeds {','.join(map(str, sweep.seeds))}. "
          f"{protocol_line(plans)} {units}, mean ± std over seeds; Δ = measured mean − paper. Cells without a "
          f"number give the run's status (reason in `status`).\n\n{evaluation_lines(plans, options.extra)}\n\n"
          f"{checkpoint_line(entries, options.checkpoint)}\n\n")
    for line in oracle_lines(plans):
        md += line + "\n\n"
    # FLOPs are totalled with --compute-matched, which counts them anyway: elsewhere each teacher's and stage run's
    # count would be a model build and a counted step more for every report
    cache = CostCache(sweep.results)
    md += cost_total_line(plans, cache, flops=sweep.compute_matched is not None) + "\n\n"
    cache.save()
    shown = df.assign(Method=[oracle_label(e.plan) for e in entries]) if entries else df  # the CSV keeps the labels
    if spec.extends:
        md += (f"Extends the table `{spec.extends}`: its rows, the same runs as its own table's, beside this spec's "
               "rows, under the same protocol.\n\n")
    md += gains_lines(gains, tuple(spec.metrics))
    md += other_split_lines(entries)
    if spec.layout == "wide":
        for m in spec.metrics:
            md += wide_markdown(shown, m, options.against, gains.compute_matched) + "\n\n"
        md += "## Status and training cost per row\n\n"
        keep = ["Network", "Method"] + [c for c in (*COST_COLUMNS, "seeds", "status") if c in df.columns]
        md += shown[keep].to_markdown(index=False, disable_numparse=True) + "\n"
    else:
        md += shown.to_markdown(index=False, disable_numparse=True) + "\n"
    md += comparison_note(df, tuple(spec.metrics), options.against)
    if gains.compute_matched:
        md += EQUAL_COMPUTE_NOTE.format(v=EQUAL_COMPUTE, by=sweep.compute_matched)
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
    written.df, written.entries, written.gains = df, entries, gains
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
