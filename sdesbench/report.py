"""Tables of measured results beside the paper's numbers (pandas -> Markdown and CSV).

Each cell is the mean ± std over seeds of the completed runs. Missing, failed or skipped runs
show as such, never as a number.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from sdesbench.engine.io import write_text
from sdesbench.experiments import PlannedRun, expand, load_spec, read_record


def _metric(rec: dict[str, Any], source: str, name: str) -> float | None:
    if source == "student":
        return (rec.get("metrics") or {}).get(name)
    return ((rec.get("extra_metrics") or {}).get(source) or {}).get(name)


def _fmt(values: list[float]) -> str:
    if not values:
        return ""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def table_frame(plans: list[PlannedRun], metrics: tuple[str, ...] = ("miou",)) -> pd.DataFrame:
    """One row per table row: measured mean ± std, paper value and difference per metric."""
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
        first = runs[0]
        row: dict[str, Any] = {"Network": first.group, "Method": first.row}
        status = []
        values: dict[str, list[float]] = {m: [] for m in metrics}
        for p in runs:
            if p.skipped:
                status.append(f"skipped: {p.skipped}")
                continue
            rec = read_record(p.out)
            if rec is None:
                status.append("missing")
            elif rec.get("status") != "completed":
                status.append(f"{rec.get('status')}: {rec.get('error') or ''}".strip(": "))
            else:
                for m in metrics:
                    v = _metric(rec, p.metric_source, m)
                    if v is not None:
                        values[m].append(100.0 * v)
        for m in metrics:
            label = {"miou": "mIoU", "pa": "PA"}[m]
            paper = first.paper.get(m)
            row[label] = _fmt(values[m]) or "—"
            row[f"paper {label}"] = paper if paper is not None else "—"
            row[f"Δ {label}"] = (f"{statistics.fmean(values[m]) - paper:+.2f}" if values[m] and paper is not None
                                 else "—")
        row["seeds"] = len(values[metrics[0]])
        row["status"] = "; ".join(sorted(set(status))) if status else "ok"
        if first.stand_in:
            row["status"] = (row["status"] + "; " if row["status"] != "ok" else "") + first.stand_in
        rows.append(row)
    return pd.DataFrame(rows)


def metric_names(spec: dict[str, Any]) -> tuple[str, ...]:
    return tuple(spec.get("metrics", ["miou"]))


def write_table(table: str, preset: str, seeds: list[int], results: Path) -> tuple[Path, str]:
    """Write results/<table>-<preset>.md and .csv; return the Markdown path and text."""
    spec = load_spec(table)
    plans = expand(spec, preset, seeds, results)
    df = table_frame(plans, metric_names(spec)).rename(columns={"miou": "mIoU"})
    title = spec.get("title", table)
    md = f"# {title}\n\nPreset `{preset}`, seeds {','.join(map(str, seeds))}. mIoU/PA in %, mean ± std over " \
         f"seeds; Δ = measured mean − paper.\n\n{df.to_markdown(index=False)}\n"
    if preset != "paper":
        md += (f"\nThe `{preset}` preset is a sanity check of the pipeline, not a reproduction: its numbers are not "
               "comparable with the paper's.\n")
    md_path = results / f"{table}-{preset}.md"
    write_text(md_path, md)
    write_text(md_path.with_suffix(".csv"), df.to_csv(index=False))
    return md_path, md
