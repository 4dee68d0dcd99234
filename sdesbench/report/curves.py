"""Training curves of a table (`sdesbench report TABLE --curves`): one PNG, `<table>-<preset>-curves.png`.

Left, the training loss (the sum of the weighted loss terms, from each run's `log.jsonl`); right,
the validation mIoU of the periodic evaluations (`history` in `results.json`, `eval.every`) against
the iteration, for every row of the table: the mean over the completed seeds, with a band from
their minimum to their maximum. A run without periodic evaluations shows its final mIoU as a point.
Rows that report the student are solid lines; Ens-T (the experts' ensemble, read from the history of
the same run: an Ens-T row, or the Ens-T of an SDES row in a table without one) is dotted; teachers
are dashed and named "teacher: <model>". An oracle line (Ens-T, routed by the ground truth: SDES Eq. 4)
carries `tables.ORACLE_MARK` in the legend, and a line under the plots says what it means. Everything
comes from the small files kept in git, so a fresh clone draws the same plot.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdesbench.engine.record import RunRecord
from sdesbench.errors import StorageError
from sdesbench.experiments.plan import PlannedRun, Sweep
from sdesbench.experiments.spec import Spec
from sdesbench.io import write_file
from sdesbench.report.tables import ORACLE_FIGURE_NOTE, ORACLE_MARK, ORACLE_PREDICTIONS

Series = dict[int, float]  # iteration -> value
EXTRA_NAMES = {"ens_t": "Ens-T"}


def loss_series(folder: Path) -> Series:
    """iteration -> total training loss from the run's log.jsonl (evaluation lines and cut lines skipped)."""
    path = Path(folder) / "log.jsonl"
    out: Series = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            if "loss" in entry:
                out[int(entry["iter"])] = float(entry["loss"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


def val_series(record: RunRecord, source: str) -> tuple[Series, bool]:
    """iteration -> mIoU (%) of the periodic evaluations, or the final point alone; and whether it is a curve."""
    points = {e.iteration: 100 * e.scores(source).miou for e in record.history if e.scores(source) is not None}
    if points:
        return points, True
    final = record.scores(source)
    return ({record.iterations: 100 * final.miou} if final is not None else {}), False


def aggregate(series: list[Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Iterations every seed has, and the mean, minimum and maximum over seeds there."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    values = np.array([[s[i] for i in common] for s in series]) if common else np.zeros((0, 0))
    if not common:
        return np.array([]), np.array([]), np.array([]), np.array([])
    return np.array(common), values.mean(0), values.min(0), values.max(0)


@dataclass
class Line:
    label: str
    style: str  # "-" student, ":" Ens-T, "--" teacher
    family: str = ""  # lines of one row (its student and its Ens-T) share a colour
    oracle: bool = False  # an oracle prediction (ORACLE_PREDICTIONS): marked in the legend
    losses: list[Series] = field(default_factory=list)
    vals: list[Series] = field(default_factory=list)
    curve: bool = False


def completed(plan: PlannedRun) -> RunRecord | None:
    try:
        rec = plan.record()
    except StorageError:
        return None
    return rec if rec is not None and rec.completed else None


def curve_lines(plans: list[PlannedRun]) -> list[Line]:
    """One line per table row (seeds pooled), per teacher that is not itself a row's run, and per extra
    prediction (Ens-T) a row's runs evaluated that no row of the table reports already."""
    groups = {p.group for p in plans if p.is_row}
    row_runs = {str(p.out) for p in plans if p.is_row and p.out is not None}
    reported = {(str(p.out), p.metric_source) for p in plans if p.is_row and p.out is not None}
    # runs that teach another network (Table 2's ResNet-50): dashed even where a row reports them; a
    # network's own trained Student that teaches its KL*/AT*/CWD* rows stays the Student line
    teaching = {str(t.out) for t in plans if t.is_teacher and t.cfg is not None
                and any(str(t.out) in p.needs("teacher") and p.cfg is not None and p.cfg.model.name != t.cfg.model.name
                        for p in plans)}
    lines: dict[tuple[str, str], Line] = {}
    for p in plans:
        if p.role == "stage":
            continue  # a stage run's artefact serves its rows; it has no curve of its own to compare
        if p.is_teacher and str(p.out) in row_runs:
            continue  # the teacher is the Student row's own run (KL*, AT*, CWD*): drawn once
        rec = completed(p) if p.cfg is not None else None
        name = p.row if len(groups) == 1 else f"{p.group} / {p.row}"
        source = "student" if p.is_teacher else p.metric_source
        if p.is_teacher:
            line = lines.setdefault((p.key, source), Line(f"teacher: {p.row}", "--", p.key))
        else:
            style = ("--" if str(p.out) in teaching else "-") if source == "student" else ":"
            oracle = source in ORACLE_PREDICTIONS
            suffix = "" if source == "student" else " (experts' ensemble)" + (f" {ORACLE_MARK}" if oracle else "")
            line = lines.setdefault((p.key, source), Line(name + suffix, style, p.key, oracle))
        if rec is None:
            continue
        if line.style != ":":  # an Ens-T row shares its run's loss with the Ours row
            line.losses.append(loss_series(p.out))
        points, is_curve = val_series(rec, source)
        line.vals.append(points)
        line.curve = line.curve or is_curve
        if source != "student" or p.is_teacher:
            continue
        for extra in dict.fromkeys(k for e in rec.history for k in e.extra):
            if (str(p.out), extra) not in reported:  # e.g. the Ens-T of an SDES row, in a table without its row
                oracle = extra in ORACLE_PREDICTIONS
                label = f"{name} ({EXTRA_NAMES.get(extra, extra)})" + (f" {ORACLE_MARK}" if oracle else "")
                ens = lines.setdefault((p.key, extra), Line(label, ":", p.key, oracle))
                ens.vals.append(val_series(rec, extra)[0])
                ens.curve = True
    return list(lines.values())


def write_curves(sweep: Sweep, spec: Spec) -> Path:
    """results/<table>-<preset>-curves.png; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    lines = curve_lines(sweep.plans(spec))
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.6))
    families = list(dict.fromkeys(line.family for line in lines))
    colours = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    drawn = 0
    for line in lines:
        colour = colours(families.index(line.family) % colours.N)
        x, mean, lo, hi = aggregate([s for s in line.losses if s])
        if len(x):
            ax_loss.plot(x, mean, line.style, color=colour, label=line.label)
            ax_loss.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
        x, mean, lo, hi = aggregate([s for s in line.vals if s])
        if len(x):
            marker = "o" if line.curve else "D"
            ax_val.plot(x, mean, line.style, color=colour, marker=marker, markersize=3 if line.curve else 5,
                        label=line.label)
            if len(x) > 1:
                ax_val.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
            drawn += 1
    if not drawn:
        for ax in (ax_loss, ax_val):
            ax.text(0.5, 0.5, "no completed runs", transform=ax.transAxes, ha="center", va="center",
                    color="tab:red")
    ax_loss.set(xlabel="iteration", ylabel="training loss (sum of weighted terms)", title="training loss")
    if any(len(aggregate([s for s in ln.losses if s])[0]) for ln in lines):
        ax_loss.set_yscale("log")  # methods add terms of very different sizes
        ax_loss.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax_loss.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax_loss.tick_params(axis="y", which="minor", labelsize=7)
    final_only = any(ln.vals and not ln.curve for ln in lines)
    ax_val.set(xlabel="iteration", ylabel="mIoU (%)",
               title="validation mIoU" + (" (◆: final evaluation only, no eval.every)" if final_only else ""))
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax_val.get_legend_handles_labels()
    if not handles:
        handles, labels = ax_loss.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                   title=f"mean over seeds {','.join(map(str, sweep.seeds))}; band = min..max", title_fontsize=8)
    fig.suptitle(f"{spec.title} (preset {sweep.preset})", fontsize=10)
    fig.tight_layout()
    if any(ln.oracle and ln.vals for ln in lines):  # below the plots; savefig's tight box takes it in
        fig.text(0.5, -0.01, ORACLE_FIGURE_NOTE.format(mark=ORACLE_MARK), ha="center", va="top", fontsize=8,
                 color="0.3")
    path = Path(sweep.results) / f"{sweep.name}-{sweep.preset}-curves.png"
    write_file(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))  # atomic
    plt.close(fig)
    return path
