"""Figure 3: one plot per swept hyper-parameter (mIoU and Ens-T against the value, the paper's choice
marked), all of them side by side in one PNG, and the numbers as Markdown/CSV. Ens-T, the experts' ensemble
routed by the ground truth (SDES Eq. 4), is an oracle: its line, its column and the header carry
`tables.ORACLE_MARK` and say so."""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from sdesbench.experiments.plan import Sweep
from sdesbench.experiments.spec import ParameterSweep, Spec
from sdesbench.experiments.sweeps import sweep_spec, sweep_values
from sdesbench.io import write_file
from sdesbench.report.numbers import fmt, mean_or_none
from sdesbench.report.rows import RowResults, collect
from sdesbench.report.tables import (ORACLE_FIGURE_NOTE, ORACLE_MARK, ORACLE_NOTE, ORACLE_PREDICTIONS, ReportOptions,
                                     Written, evaluation_lines, short_status, write_outputs)

ENS_T = "ens_t"
ENS_T_LABEL = f"Ens-T {ORACLE_MARK}"  # the oracle's line and column


def saver(fig: Any, dpi: int):
    """A writer of `fig` as PNG (for `write_outputs`, which decides whether it is written)."""
    def save(path: Path) -> None:
        write_file(path, lambda f: fig.savefig(f, format="png", dpi=dpi))  # atomic; a full disk is one line

    return save


def _mark_paper_choice(ax, best: Any) -> None:
    if isinstance(best, (list, tuple)):
        ax.axvspan(best[0], best[1], color="tab:green", alpha=0.15, label=f"paper: {best[0]:g}–{best[1]:g}")
    elif best is not None:
        ax.axvline(best, color="tab:green", linestyle="--", label=f"paper: {best:g}")


def lay_out(fig, oracle: bool) -> None:
    """tight_layout, with a line under the plots saying what the Ens-T line's mark means when it is drawn."""
    fig.tight_layout(rect=(0, 0.06, 1, 1) if oracle else None)
    if oracle:
        fig.text(0.5, 0.01, ORACLE_FIGURE_NOTE.format(mark=ORACLE_MARK), ha="center", va="bottom", fontsize=7,
                 color="0.3")


def write_sweep_figure(sweep: Sweep, spec: Spec, options: ReportOptions | None = None) -> Written:
    """results/<table>-<preset>.md/.csv and one PNG per swept parameter (+ all of them in one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(spec.sweeps)
    results = Path(sweep.results)
    frames = []
    all_plans = []
    figures: list[tuple[Path, Any, int]] = []
    any_oracle = False
    fig_all, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), squeeze=False)
    for i, param in enumerate(params):
        sw = spec.sweeps[param]
        values = sweep_values(spec, results, sweep.preset, param)
        plans = sweep.plans(sweep_spec(spec, param, values))
        all_plans += plans
        entries = collect(plans, ("miou",))
        # the Ens-T line (the experts' ensemble) is drawn where the method reports it
        ens = collect([dataclasses.replace(p, metric_source=ENS_T) for p in plans], ("miou",))
        ens_by_key = {e.plan.key: e.values["miou"] for e in ens}
        rows = []
        for v, e in zip(values, entries):
            vals, ens_vals = e.values["miou"], ens_by_key.get(e.plan.key, [])
            rows.append({"param": param, "value": v, "mIoU": fmt(vals) or short_status(e.status),
                         "mean": mean_or_none(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
                         "Ens-T mIoU": fmt(ens_vals) or "—", "seeds": len(vals), "status": e.status_text()})
        df = pd.DataFrame(rows)
        frames.append(df)
        fig, ax = plt.subplots(figsize=(4.8, 3.6))
        for a in (ax, axes[0][i]):
            oracle = _draw_sweep(a, param, sw, df, ens_by_key, entries)
        any_oracle = any_oracle or oracle
        lay_out(fig, oracle)
        figures.append((results / f"{sweep.name}-{sweep.preset}-{param}.png", fig, 110))
    fig_all.suptitle(f"{spec.title} (preset {sweep.preset})")
    lay_out(fig_all, any_oracle)
    all_png = results / f"{sweep.name}-{sweep.preset}.png"
    figures.append((all_png, fig_all, 100))
    df = pd.concat(frames, ignore_index=True)
    shown = df.drop(columns=["mean", "std"]).rename(columns={"Ens-T mIoU": f"{ENS_T_LABEL} mIoU"})  # the CSV: plain
    chosen = ", ".join(f"{p}: {spec.sweeps[p].best}" for p in params)
    oracle = ORACLE_NOTE.format(mark=ORACLE_MARK, why=ORACLE_PREDICTIONS[ENS_T])
    md = (f"# {spec.title}\n\nPreset `{sweep.preset}`, seeds {','.join(map(str, sweep.seeds))}. mIoU in %, mean ± "
          "std over seeds. The paper gives curves, not numbers; its chosen values are marked on the plots "
          f"({chosen}).\n\n{evaluation_lines(all_plans)}\n\n{oracle}\n\n"
          f"![Figure 3]({all_png.name})\n\n{shown.to_markdown(index=False, disable_numparse=True)}\n")
    try:
        written = write_outputs(sweep, md, df, (options or ReportOptions()).force,
                                [(path, saver(fig, dpi)) for path, fig, dpi in figures])
    finally:
        for _, fig, _ in figures:
            plt.close(fig)
    return written


def _draw_sweep(ax, param: str, sw: ParameterSweep, df: pd.DataFrame, ens_by_key: dict[str, list[float]],
                entries: list[RowResults]) -> bool:
    """Draw one parameter's sweep; whether it drew the Ens-T (oracle) line."""
    drawn = False
    done = df[df["mean"].notna()]
    if sw.log:
        ax.set_xscale("log")
    if len(done):
        ax.errorbar(done["value"], done["mean"], yerr=done["std"].fillna(0).tolist(), marker="o", capsize=3,
                    label="student")
        ens = [(v, mean_or_none(ens_by_key.get(e.plan.key, []))) for v, e in zip(df["value"], entries)]
        ens = [(v, m) for v, m in ens if m is not None]
        if ens:
            ax.plot([v for v, _ in ens], [m for _, m in ens], marker="s", linestyle=":", label=ENS_T_LABEL)
            drawn = True
    missing = df[df["mean"].isna()]
    if len(missing):
        reasons = sorted({s.split(";")[0] for s in missing["status"]})
        text = "no completed runs" if not len(done) else f"{len(missing)} value(s) without a completed run"
        ax.text(0.5, 0.5, text + "\n" + "\n".join(reasons)[:160], transform=ax.transAxes, ha="center",
                va="center", fontsize=7, wrap=True, color="tab:red")
        ax.set_xlim(min(df["value"]) * (0.8 if sw.log else 1) - (0 if sw.log else 0.05),
                    max(df["value"]) * (1.2 if sw.log else 1) + (0 if sw.log else 0.05))
    _mark_paper_choice(ax, sw.best)
    ax.set_xlabel(sw.label or param)
    ax.set_ylabel("mIoU (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return drawn
