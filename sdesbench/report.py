"""Tables of measured results beside the paper's numbers (pandas -> Markdown and CSV), Figure 3 plots.

Each measured cell is the mean ± std over seeds of the completed runs, next to the paper's number
and the difference (measured mean − paper). A row without a completed run shows its status in the
cell (`skipped`, `missing`, `failed`, `interrupted`) with the reason in the status column; never a
number. Layouts follow the paper: `long` (one line per method: Tables 2-4) or `wide` (networks as
rows, methods as columns: Table 1). The CSV beside each Markdown file is always long (one line per
row, machine-readable). Params/FLOPs come from `sdesbench.costs` (the profiler when present);
training cost per row from the results records: seconds per iteration (wall_time_s / iterations),
peak memory, and training FLOPs relative to the plain student (teachers and experts included).
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from sdesbench.engine.io import write_text
from sdesbench.experiments import (PlannedRun, expand, list_tables, load_spec, read_record, sweep_spec,
                                   sweep_values)

METRIC_LABEL = {"miou": "mIoU", "pa": "PA"}
RECORD_KEY = {"miou": "miou", "pa": "pixel_acc"}  # paper metric -> results.json key
NOT_SAME_SCALE = ("\nThe `{preset}` preset is a sanity check of the pipeline, not a reproduction: its numbers "
                  "are not comparable with the paper's.\n")


def _metric(rec: dict[str, Any], source: str, name: str) -> float | None:
    key = RECORD_KEY.get(name, name)
    if source == "student":
        return (rec.get("metrics") or {}).get(key)
    return ((rec.get("extra_metrics") or {}).get(source) or {}).get(key)


def _fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _short_status(statuses: list[str]) -> str:
    """The word shown in a cell without a number: the most telling status of its runs."""
    for word in ("failed", "interrupted", "missing", "skipped"):
        if any(s.startswith(word) for s in statuses):
            return word
    return "missing"


def collect(plans: list[PlannedRun], metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """One entry per table row: values per metric over seeds, statuses, records, the plans."""
    order: list[str] = []
    by_key: dict[str, list[PlannedRun]] = {}
    for p in plans:
        if p.is_teacher:
            continue
        if p.key not in by_key:
            order.append(p.key)
        by_key.setdefault(p.key, []).append(p)
    rows = []
    for key in order:
        runs = by_key[key]
        entry: dict[str, Any] = {"plan": runs[0], "runs": runs, "values": {m: [] for m in metrics},
                                 "status": [], "records": []}
        for p in runs:
            if p.skipped:
                entry["status"].append(f"skipped: {p.skipped}")
                continue
            rec = read_record(p.out)
            if rec is None:
                entry["status"].append("missing: not run yet")
            elif rec.get("status") != "completed":
                entry["status"].append(f"{rec.get('status')}: {rec.get('error') or 'no error recorded'}")
            else:
                entry["records"].append((p, rec))
                for m in metrics:
                    v = _metric(rec, p.metric_source, m)
                    if v is None:
                        entry["status"].append(f"missing: no {p.metric_source} {m} in {p.out}/results.json")
                    else:
                        entry["values"][m].append(100.0 * v)
        rows.append(entry)
    return rows


def _status_text(entry: dict[str, Any]) -> str:
    parts = sorted(set(entry["status"]))
    n = len(entry["records"])
    text = "; ".join(parts) if parts else "ok"
    if parts and n:
        text = f"{n} completed; {text}"
    if entry["plan"].stand_in:
        text = (text + "; " if text != "ok" else "") + entry["plan"].stand_in
    return text


class SizeColumns:
    """Params / FLOPs of a row's network at the paper's input size (spec `profile:`)."""

    def __init__(self, spec: dict[str, Any], results: Path):
        from sdesbench.costs import CostCache

        self.prof = spec.get("profile") or {}
        self.columns = list(self.prof.get("columns", ["params", "flops"])) if self.prof else []
        self.cache = CostCache(results)
        self.notes: set[str] = set()

    def cells(self, plan: PlannedRun, group: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        from sdesbench.costs import method_params_m, model_profile
        from sdesbench.registry import MODELS

        out: dict[str, Any] = {}
        if not self.columns:
            return out
        paper_params = row.get("params_m", group.get("params_m"))
        paper_flops = row.get("gflops", group.get("gflops"))
        params = flops = None
        why = ""
        if plan.model not in MODELS:
            why = "missing"
        else:
            nc, hw = self.prof["num_classes"], self.prof.get("input_hw", [512, 512])
            prof = self.cache.get(f"profile:{plan.model}:{nc}:{hw}", lambda: model_profile(plan.model, nc, hw))
            params, flops = prof["params_m"], prof["gflops"]
            if prof["gflops"] is None and "flops" in self.columns:
                self.notes.add("FLOPs: `sdesbench.profile` is not available, so FLOPs are not measured "
                               "(Params are counted with `count_params`).")
            if plan.metric_source != "student":  # an ensemble teacher: student + the method's modules
                flops = None
                if plan.cfg is not None and plan.cfg.model.name == plan.model:
                    params = self.cache.get(f"method_params:{plan.cfg.identity_hash()}",
                                            lambda: method_params_m(plan.cfg))
                    self.notes.add(f"{plan.row} Params: the student plus the method's own modules; its FLOPs "
                                   "are not profiled.")
                else:
                    params, why = None, "missing"
        if "params" in self.columns:
            out["Params (M)"] = f"{params:.2f}" if params is not None else (why or "—")
            out["paper Params"] = f"{paper_params:.2f}" if paper_params is not None else "—"
        if "flops" in self.columns:
            out["FLOPs (G)"] = f"{flops:.2f}" if flops is not None else (why or "—")
            out["paper FLOPs"] = f"{paper_flops:.2f}" if paper_flops is not None else "—"
        return out


def cost_cells(entry: dict[str, Any], cache) -> dict[str, Any]:
    """Seconds per iteration, peak memory and training FLOPs relative to the student."""
    from sdesbench.costs import train_flops_ratio

    recs = entry["records"]
    if not recs:
        return {"s/iter": "—", "peak MB": "—", "train FLOPs ×": "—"}
    per_iter = [r["wall_time_s"] / r["iterations"] for _, r in recs if r.get("iterations")]
    peak = [r["peak_memory_mb"] for _, r in recs if r.get("peak_memory_mb") is not None]
    plan = recs[0][0]
    try:
        ratio = f"{train_flops_ratio(plan.cfg, cache):.2f}"
    except Exception as e:  # a method that cannot be built without data: say so, do not guess
        ratio = f"n/a ({type(e).__name__})"
    return {"s/iter": _fmt(per_iter, 3) or "—", "peak MB": _fmt(peak, 0) or "—", "train FLOPs ×": ratio}


def _spec_rows(spec: dict[str, Any]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    return {f"{g['name']}/{r['label']}": (g, r) for g in spec.get("groups", []) for r in g["rows"]}


def table_frame(plans: list[PlannedRun], metrics: tuple[str, ...] = ("miou",), spec: dict[str, Any] | None = None,
                results: Path | None = None, cost: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Long table: one line per row with measured, paper and Δ per metric (+ sizes, cost, status)."""
    spec = spec or {}
    rows_by_key = _spec_rows(spec)
    sizes = SizeColumns(spec, results or Path("results"))
    lines = []
    for entry in collect(plans, metrics):
        plan = entry["plan"]
        line: dict[str, Any] = {"Network": plan.group, "Method": plan.row, **plan.show}
        for m in metrics:
            label = METRIC_LABEL.get(m, m)
            vals = entry["values"][m]
            paper = plan.paper.get(m)
            line[label] = _fmt(vals) or _short_status(entry["status"])
            line[f"paper {label}"] = f"{paper:.2f}" if paper is not None else "—"
            line[f"Δ {label}"] = f"{_mean(vals) - paper:+.2f}" if vals and paper is not None else "—"
        group, row = rows_by_key.get(plan.key, ({}, {}))
        line.update(sizes.cells(plan, group, row))
        if cost:
            line.update(cost_cells(entry, sizes.cache))
        line["seeds"] = len(entry["values"][metrics[0]])
        line["status"] = _status_text(entry)
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


def metric_names(spec: dict[str, Any]) -> tuple[str, ...]:
    return tuple(spec.get("metrics", ["miou"]))


def write_table(table: str, preset: str, seeds: list[int], results: Path,
                overrides: list[str] | None = None) -> tuple[Path, str]:
    """Write results/<table>-<preset>.md and .csv; return the Markdown path and text.

    `overrides` are the `--set` values the runs were made with (they are part of each run's hash).
    """
    spec = load_spec(table)
    if spec.get("sweeps"):
        return write_figure3(table, preset, seeds, results, overrides)
    plans = expand(spec, preset, seeds, results, overrides)
    metrics = metric_names(spec)
    cost = bool(spec.get("cost", True))
    df, notes = table_frame(plans, metrics, spec, results, cost=cost)
    title = spec.get("title", table)
    units = "mIoU/PA in %" if "pa" in metrics else "mIoU in %"
    md = (f"# {title}\n\nPreset `{preset}`, seeds {','.join(map(str, seeds))}. {units}, mean ± std over seeds; "
          f"Δ = measured mean − paper. Cells without a number give the run's status (reason in `status`).\n\n")
    if spec.get("layout") == "wide":
        for m in metrics:
            md += wide_markdown(df, m) + "\n\n"
        md += "## Status and training cost per row\n\n"
        keep = ["Network", "Method"] + [c for c in ("s/iter", "peak MB", "train FLOPs ×", "seeds", "status")
                                        if c in df.columns]
        md += df[keep].to_markdown(index=False, disable_numparse=True) + "\n"
    else:
        md += df.to_markdown(index=False, disable_numparse=True) + "\n"
    if cost:
        md += ("\nTraining cost: `s/iter` = wall_time_s / iterations; `peak MB` = peak CUDA memory, or the "
               "process's max RSS on CPU; `train FLOPs ×` = FLOPs of one training step (teacher forward, student "
               "and method modules forward + backward) over the plain student's, counted with torch's "
               "FlopCounterMode at 64x64.\n")
    for n in notes:
        md += f"\n{n}\n"
    return write_outputs(results, table, preset, md, df)


def write_outputs(results: Path, table: str, preset: str, md: str, df: pd.DataFrame) -> tuple[Path, str]:
    """results/<table>-<preset>.md (with the not-a-reproduction note off the paper preset) and .csv."""
    if preset != "paper":
        md += NOT_SAME_SCALE.format(preset=preset)
    md_path = results / f"{table}-{preset}.md"
    write_text(md_path, md)
    write_text(md_path.with_suffix(".csv"), df.to_csv(index=False))
    return md_path, md


# ----------------------------------------------------------------------------- Figure 3


def _mark_paper_choice(ax, best: Any) -> None:
    if isinstance(best, (list, tuple)):
        ax.axvspan(best[0], best[1], color="tab:green", alpha=0.15, label=f"paper: {best[0]}–{best[1]}")
    else:
        ax.axvline(best, color="tab:green", linestyle="--", label=f"paper: {best}")


def write_figure3(table: str, preset: str, seeds: list[int], results: Path,
                  overrides: list[str] | None = None) -> tuple[Path, str]:
    """results/fig3-<preset>.md/.csv and one PNG per swept parameter (+ all four in one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = load_spec(table)
    params = list(spec["sweeps"])
    frames = []
    fig_all, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), squeeze=False)
    pngs = []
    for i, param in enumerate(params):
        sw = spec["sweeps"][param]
        values = sweep_values(spec, results, preset, param)
        plans = expand(sweep_spec(spec, param, values), preset, seeds, results, overrides)
        entries = collect(plans, ("miou",))
        # the Ens-T line (the experts' ensemble) is drawn where the method reports it
        ens = collect([dataclasses.replace(p, metric_source="ens_t") for p in plans], ("miou",))
        ens_by_key = {e["plan"].key: e["values"]["miou"] for e in ens}
        rows = []
        for v, e in zip(values, entries):
            vals, ens_vals = e["values"]["miou"], ens_by_key.get(e["plan"].key, [])
            rows.append({"param": param, "value": v, "mIoU": _fmt(vals) or _short_status(e["status"]),
                         "mean": _mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
                         "Ens-T mIoU": _fmt(ens_vals) or "—", "seeds": len(vals), "status": _status_text(e)})
        df = pd.DataFrame(rows)
        frames.append(df)
        fig, ax = plt.subplots(figsize=(4.8, 3.6))
        for a in (ax, axes[0][i]):
            _draw_sweep(a, param, sw, df, ens_by_key, entries)
        fig.tight_layout()
        png = results / f"fig3-{preset}-{param}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        plt.close(fig)
        pngs.append(png)
    fig_all.suptitle(spec.get("title", "Figure 3") + f" (preset {preset})")
    fig_all.tight_layout()
    all_png = results / f"fig3-{preset}.png"
    fig_all.savefig(all_png, dpi=100)
    plt.close(fig_all)
    df = pd.concat(frames, ignore_index=True)
    shown = df.drop(columns=["mean", "std"])
    chosen = ", ".join(f"{p}: {spec['sweeps'][p].get('best')}" for p in params)
    md = (f"# {spec.get('title', table)}\n\nPreset `{preset}`, seeds {','.join(map(str, seeds))}. mIoU in %, mean ± "
          "std over seeds. The paper gives curves, not numbers; its chosen values are marked on the plots "
          f"({chosen}).\n\n"
          f"![Figure 3]({all_png.name})\n\n{shown.to_markdown(index=False, disable_numparse=True)}\n")
    return write_outputs(results, table, preset, md, df)


def _draw_sweep(ax, param: str, sw: dict[str, Any], df: pd.DataFrame, ens_by_key, entries) -> None:
    done = df[df["mean"].notna()]
    if sw.get("log"):
        ax.set_xscale("log")
    if len(done):
        ax.errorbar(done["value"], done["mean"], yerr=done["std"].fillna(0).tolist(), marker="o", capsize=3,
                    label="student")
        ens = [(v, _mean(ens_by_key.get(e["plan"].key, []))) for v, e in zip(df["value"], entries)]
        ens = [(v, m) for v, m in ens if m is not None]
        if ens:
            ax.plot([v for v, _ in ens], [m for _, m in ens], marker="s", linestyle=":", label="Ens-T")
    missing = df[df["mean"].isna()]
    if len(missing):
        reasons = sorted({s.split(";")[0] for s in missing["status"]})
        text = "no completed runs" if not len(done) else f"{len(missing)} value(s) without a completed run"
        ax.text(0.5, 0.5, text + "\n" + "\n".join(reasons)[:160], transform=ax.transAxes, ha="center",
                va="center", fontsize=7, wrap=True, color="tab:red")
        ax.set_xlim(min(df["value"]) * (0.8 if sw.get("log") else 1) - (0 if sw.get("log") else 0.05),
                    max(df["value"]) * (1.2 if sw.get("log") else 1) + (0 if sw.get("log") else 0.05))
    _mark_paper_choice(ax, sw.get("best"))
    ax.set_xlabel(sw.get("label", param))
    ax.set_ylabel("mIoU (%)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)


def report_tables(tables: list[str] | None) -> list[str]:
    return tables or list_tables()
