"""Forest plot of a table's differences to its Student rows (`sdesbench report TABLE --plot`): one PNG,
`<table>-<preset>-forest.png`.

One line per row of the table that has a Student row in its group (the Student row itself is the 0 it
is measured against), one panel per metric. Each line shows the row's Δ (row − Student, in points) with
every 95% interval the report computed for it, one below the other, each in its own colour and named in
the legend by what it covers (`stats.COVERS`): seeds (Welch), seeds + test images (two-level
bootstrap), test images only (never starred: dashed and grey). A vertical line marks 0, so whether an
interval crosses it, and how the intervals of one row overlap, is seen at a glance; `*` follows an
interval that excludes 0 where the table stars it. Beside the intervals, a green cross marks the gain the
paper claims for the row (paper row − paper Student row), and the row's label carries the verdict on that
claim (with two or more seeds): whether the measured interval reaches the claim is seen at a glance. A row
reporting an oracle prediction (SDES's Ens-T, routed by the ground truth) carries `tables.ORACLE_MARK`, and a
line under the plot says what it means. The numbers are the table's own (`report/gains.py`'s `Gains`, which
the tables read too), so the plot and the table cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdesbench.experiments.plan import Sweep
from sdesbench.experiments.spec import Spec
from sdesbench.io import write_file
from sdesbench.report.gains import Gains
from sdesbench.report.rows import RowResults
from sdesbench.report.stats import COVERS, Difference
from sdesbench.report.tables import METRIC_LABEL, ORACLE_FIGURE_NOTE, ORACLE_MARK, oracle_label

STYLE = {"welch": ("tab:blue", "o", "-"), "two_level": ("tab:red", "s", "-"), "images": ("0.55", "D", (0, (3, 2)))}
OFFSET = {"welch": -0.3, "two_level": -0.1, "images": 0.1, "claimed": 0.3}  # within a row's line, top to bottom
CLAIMED = ("tab:green", "X")
CLAIMED_LABEL = "the paper's claimed gain (paper row − paper Student row)"


@dataclass(frozen=True)
class ForestRow:
    """One line of the plot: the row's label and its differences to the Student row, per test."""

    label: str
    group: str
    intervals: dict[str, Difference]
    claimed: float | None = None  # the paper's gain (paper row − paper Student row)
    verdict: str | None = None  # on the claim (`gains.verdict`), with two or more seeds
    oracle: bool = False  # the row reports an oracle prediction (its label carries ORACLE_MARK)

    @property
    def tick(self) -> str:
        """The row's label on the plot, with the verdict on its claim below it."""
        return f"{self.label}\n({self.verdict})" if self.verdict else self.label


def forest_rows(entries: list[RowResults], gains: Gains, metric: str) -> list[ForestRow]:
    """The rows compared with a Student row, in table order (a row whose sides lack runs has no intervals)."""
    groups = {e.plan.group for e in entries}
    rows = []
    for e in entries:
        comparison = gains.of(e)
        if comparison.is_reference or metric not in comparison.gains:
            continue
        gain = comparison.gains[metric]
        shown = oracle_label(e.plan)
        label = shown if len(groups) == 1 else f"{e.plan.group} / {shown}"
        found = {test: d for test, d in gain.tests.items() if d is not None}
        rows.append(ForestRow(label, e.plan.group, found, gain.claimed, gain.verdict, shown != e.plan.row))
    return rows


def forest_figure(panels: dict[str, list[ForestRow]], title: str):
    """The matplotlib figure: one panel per metric (label -> rows), the rows top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(panels.values()))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 1.4 + 0.75 * len(first)), squeeze=False,
                             sharey=True)
    shown: dict[str, object] = {}
    for ax, (metric, rows) in zip(axes[0], panels.items()):
        for y, row in enumerate(rows):
            if not row.intervals:
                ax.text(0, y, "no interval (a side lacks runs)", ha="center", va="center", fontsize=8, color="tab:red",
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
            for test, d in row.intervals.items():
                colour, marker, line = STYLE[test]
                bars = ax.errorbar(d.delta, y + OFFSET[test], xerr=[[d.delta - d.low], [d.high - d.delta]],
                                   fmt=marker, color=colour, ecolor=colour, capsize=3, markersize=5,
                                   label=COVERS[test])
                bars[-1][0].set_linestyle(line)
                shown.setdefault(test, bars)
                if d.starred:
                    ax.annotate("*", (d.high, y + OFFSET[test]), xytext=(4, 0), textcoords="offset points",
                                va="center", fontsize=12, color=colour)
            if row.claimed is not None:
                colour, marker = CLAIMED
                shown.setdefault("claimed", ax.plot(row.claimed, y + OFFSET["claimed"], marker, color=colour,
                                                    markersize=7, linestyle="none", label=CLAIMED_LABEL)[0])
            if y and row.group != rows[y - 1].group:
                ax.axhline(y - 0.5, color="0.8", linewidth=0.8)
        ax.axvline(0, color="black", linewidth=1)
        low, high = ax.get_xlim()
        pad = 0.05 * (high - low)
        ax.set_xlim(min(low, -pad), max(high, pad))  # 0 always in view, off the frame
        ax.set_xlabel(f"Δ {metric} vs the Student row (points), 95% intervals")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(first)), [r.tick for r in first])
    axes[0][0].set_ylim(len(first) - 0.5, -0.5)  # the table's first row on top
    if shown:
        keys = [t for t in (*COVERS, "claimed") if t in shown]
        names = {**COVERS, "claimed": CLAIMED_LABEL}
        fig.legend([shown[t] for t in keys], [names[t] for t in keys], loc="upper center", fontsize=8,
                   bbox_to_anchor=(0.5, 0.0), title_fontsize=8,
                   title="each interval covers (* after one: it excludes 0, starred in the table); "
                         "(verdict) under a row: on the paper's claim")
    if any(r.oracle for rows in panels.values() for r in rows):
        title += "\n" + ORACLE_FIGURE_NOTE.format(mark=ORACLE_MARK)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()  # the legend hangs below the figure; savefig's tight box takes it in
    return fig


def write_forest(sweep: Sweep, spec: Spec, entries: list[RowResults], gains: Gains) -> Path | None:
    """results/<table>-<preset>-forest.png; None (nothing written) when no row has an interval to draw."""
    import matplotlib.pyplot as plt

    panels = {METRIC_LABEL.get(m, m): forest_rows(entries, gains, m) for m in spec.metrics}
    if not any(r.intervals for rows in panels.values() for r in rows):
        return None
    fig = forest_figure(panels, f"{spec.title} (preset {sweep.preset}, seeds {','.join(map(str, sweep.seeds))})")
    path = Path(sweep.results) / f"{sweep.name}-{sweep.preset}-forest.png"
    write_file(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))  # atomic
    plt.close(fig)
    return path
