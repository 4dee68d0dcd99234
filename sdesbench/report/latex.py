"""A table as LaTeX, to paste into a paper (`sdesbench report TABLE --format latex`).

booktabs rules, laid out like the paper's table: `long` specs one line per method under a line
naming each network, `wide` specs (Table 1) networks as rows and methods as columns with a
"measured" and a "paper" line per network. Measured cells are mean $\\pm$ std over seeds (the plain
value with one seed), the best measured value of each network in bold (among the rows that report
the student itself: never Ens-T, never a lone row), the paper's numbers in their own column (line).
A cell without a measured number gives the run's status in italics. Loss names written `L_SS` in the
specs are set as the paper sets them, $\\mathcal{L}_{SS}$. The file is a `table` environment for
`\\input`; it needs `\\usepackage{booktabs,amssymb}` (amssymb for \\checkmark). A row reporting an oracle
prediction (Ens-T: routed by the ground truth) carries a $^\\dagger$ and the caption says what it means.

Gains (`report/gains.py`, the same numbers as the Markdown table's): beside each metric the paper gives, the
measured gain over the network's Student row (with its Welch 95% interval, 2+ seeds), the paper's claimed gain
and, with 2+ seeds, the verdict on the claim, whose rules the caption states; each network's line says how far
our Student row lies from the paper's.
"""
from __future__ import annotations

import re
import statistics
import unicodedata
from typing import Any

import pandas as pd

from sdesbench.experiments.plan import Sweep
from sdesbench.experiments.spec import Spec
from sdesbench.report.gains import VERDICTS, Comparison, Gains
from sdesbench.report.rows import RowResults
from sdesbench.report.tables import METRIC_LABEL, PAPER_METRICS, oracle_label, oracle_lines, short_status

SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
           "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "✓": r"\checkmark{}",
           "✗": r"$\times$", "×": r"$\times$", "—": "--", "–": "--", "−": "$-$", "±": r"$\pm$", "Δ": r"$\Delta$",
           "α": r"$\alpha$", "β": r"$\beta$", "γ": r"$\gamma$", "τ": r"$\tau$", "†": r"$^\dagger$"}
SIZE_COLUMNS = ("Params (M)", "paper Params", "FLOPs (G)", "paper FLOPs")
PREAMBLE = r"\usepackage{booktabs,amssymb}"
# a loss name (L_SS, L_DPED, ...) or a sum of them, not part of a longer word: one math span
LOSS_SUM = re.compile(r"(?<![A-Za-z0-9])L_[A-Za-z]+\b(?:\s*\+\s*L_[A-Za-z]+\b)*")
# the float numbers itself: "Table 4: ..." would be captioned "Table 1: Table 4: ..."
TABLE_NUMBER = re.compile(r"^\s*Table\s+\d+\s*:\s*")


def escape(text: Any) -> str:
    """Text as LaTeX: loss names as the paper's math ($\\mathcal{L}_{SS}$), special characters escaped,
    the symbols of the tables spelled as macros, any other non-ASCII character reduced to its ASCII base
    (pdflatex's default input has no glyph for it)."""
    text, out, start = str(text), [], 0
    for match in LOSS_SUM.finditer(text):
        out.append(escape_chars(text[start:match.start()]))
        terms = re.findall(r"L_([A-Za-z]+)", match.group())
        out.append("$" + " + ".join(rf"\mathcal{{L}}_{{{t}}}" for t in terms) + "$")
        start = match.end()
    out.append(escape_chars(text[start:]))
    return "".join(out)


def escape_chars(text: str) -> str:
    out = []
    for ch in text:
        if ch in SPECIAL:
            out.append(SPECIAL[ch])
        elif ord(ch) < 128:
            out.append(ch)
        else:
            out.append(unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode())
    return "".join(out)


def measured(values: list[float], statuses: list[str], bold: bool = False) -> str:
    if not values:
        return r"\textit{" + short_status(statuses) + "}"
    text = f"{statistics.fmean(values):.2f}"
    if len(values) > 1:
        text += rf" $\pm$ {statistics.stdev(values):.2f}"
    return r"\textbf{" + text + "}" if bold else text


def paper(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "--"


def best_rows(entries: list[RowResults], metric: str) -> set[int]:
    """Indices (into `entries`) of the best measured mean of each group, among rows reporting the student
    (ties all bold); a group with fewer than two such rows has none."""
    best: set[int] = set()
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        if e.plan.metric_source == "student" and e.values[metric]:
            groups.setdefault(e.plan.group, []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        means = {i: round(statistics.fmean(entries[i].values[metric]), 2) for i in members}
        top = max(means.values())
        best |= {i for i, m in means.items() if m == top}
    return best


def claimed_metrics(spec: Spec, gains: Gains | None) -> list[str]:
    """The metrics that get gain columns: those the paper gives, in a table with a Student row."""
    return [m for m in spec.metrics if m in PAPER_METRICS] if gains is not None and gains.has_student else []


def gain_cells(comparison: Comparison, metric: str, verdicts: bool) -> list[str]:
    """The measured gain (with its Welch interval), the claimed one and (with `verdicts`) the verdict."""
    if comparison.is_reference:
        return ["ref", "ref"] + ([""] if verdicts else [])
    g = comparison.gains.get(metric)
    measured = "--" if g is None or g.measured is None else f"{g.measured:+.2f}"
    if g is not None and g.welch is not None:
        measured += rf" {{\scriptsize [{g.welch.low:+.2f}, {g.welch.high:+.2f}]}}"
    claimed = "--" if g is None or g.claimed is None else f"{g.claimed:+.2f}"
    return [measured, claimed] + ([rf"\textit{{{escape(g.verdict)}}}" if g and g.verdict else "--"] if verdicts else [])


def gains_caption(gains: Gains | None) -> str:
    """What the gain columns hold and, with verdicts, every verdict's rule."""
    if gains is None or not gains.has_student:
        return ""
    text = (" Gain: our row's mean − our Student row's, in points (the gain measured; with 2+ seeds its Welch 95% "
            "interval over seeds, CI, follows it); paper gain: the paper's row − the paper's Student row (the gain "
            "the paper claims)")
    if gains.verdicts:
        text += "; verdict: " + "; ".join(f"{v}: {rule}" for v, rule in VERDICTS.items())
    return escape(text + ".")


def caption(sweep: Sweep, spec: Spec, entries: list[RowResults] = (), gains: Gains | None = None) -> str:
    title = TABLE_NUMBER.sub("", spec.title)
    notes = [escape(n) for n in oracle_lines([e.plan for e in entries])]  # what the rows' daggers mean
    return (escape(title[:1].upper() + title[1:]) + f". Measured (preset \\texttt{{{escape(sweep.preset)}}}, seeds "
            f"{','.join(map(str, sweep.seeds))}): mean $\\pm$ std over seeds, the best of each network in bold; "
            "paper: the paper's number." + gains_caption(gains) + "".join(" " + n for n in notes))


def wrap(sweep: Sweep, spec: Spec, columns: str, header: list[str], body: list[str],
         entries: list[RowResults], gains: Gains | None) -> str:
    lines = [f"% {escape(spec.title)} -- written by `sdesbench report {sweep.table} --preset {sweep.preset} "
             "--format latex`.", f"% Needs {PREAMBLE} in the preamble.",
             r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{caption(sweep, spec, entries, gains)}}}",
             rf"\label{{tab:{sweep.name}-{sweep.preset}}}", rf"\begin{{tabular}}{{{columns}}}", r"\toprule",
             " & ".join(header) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def group_line(group: str, gains: Gains | None, spec: Spec) -> str:
    """A network's name, with how far our Student row lies from the paper's (the gains' baseline)."""
    base = gains.baselines.get(group) if gains is not None else None
    claimed = claimed_metrics(spec, gains)
    if base is None or not claimed:
        return escape(group)
    return escape(group) + " -- " + escape("; ".join(base.sentence(m, METRIC_LABEL.get(m, m)) for m in claimed))


def long_table(sweep: Sweep, spec: Spec, df: pd.DataFrame, entries: list[RowResults], gains: Gains | None) -> str:
    """One line per method, a line naming each network above its rows, `\\midrule` between networks."""
    show = list(dict.fromkeys(k for e in entries for k in e.plan.show))  # the paper's extra columns
    sizes = [c for c in SIZE_COLUMNS if c in df.columns]
    claimed = claimed_metrics(spec, gains)
    verdicts = bool(gains and gains.verdicts)
    header = ["Method", *map(escape, show), *map(escape, sizes)]
    columns = "l" + "c" * len(show) + "r" * len(sizes)
    for m in spec.metrics:
        header += [escape(METRIC_LABEL.get(m, m)), "paper"]
        columns += "rr"
        if m in claimed:
            header += ["gain", "paper gain"] + (["verdict"] if verdicts else [])
            columns += "rr" + ("l" if verdicts else "")
    bold = {m: best_rows(entries, m) for m in spec.metrics}
    body: list[str] = []
    group = None
    for i, (entry, (_, line)) in enumerate(zip(entries, df.iterrows())):
        if entry.plan.group != group:
            if group is not None:
                body.append(r"\midrule")
            group = entry.plan.group
            body.append(rf"\multicolumn{{{len(header)}}}{{l}}{{\textit{{{group_line(group, gains, spec)}}}}} \\")
        cells = [escape(oracle_label(entry.plan)), *(escape(entry.plan.show.get(c, "")) for c in show),
                 *(escape(line[c]) for c in sizes)]
        for m in spec.metrics:
            cells += [measured(entry.values[m], entry.status, i in bold[m]), paper(entry.plan.paper.get(m))]
            if m in claimed:
                cells += gain_cells(gains.of(entry), m, verdicts)
        body.append(" & ".join(cells) + r" \\")
    return wrap(sweep, spec, columns, header, body, entries, gains)


def wide_table(sweep: Sweep, spec: Spec, entries: list[RowResults], gains: Gains | None) -> str:
    """Networks as rows, methods as columns: a measured and a paper line per network (and metric), and the
    gain, paper gain (and verdict) lines of the metrics the paper gives."""
    methods = list(dict.fromkeys(e.plan.row for e in entries))
    labels = {e.plan.row: escape(oracle_label(e.plan)) for e in entries}
    header = ["Network", "", *(labels[r] for r in methods)]
    claimed = claimed_metrics(spec, gains)
    verdicts = bool(gains and gains.verdicts)
    body: list[str] = []
    for m in spec.metrics:
        bold = best_rows(entries, m)
        for k, group in enumerate(dict.fromkeys(e.plan.group for e in entries)):
            if k:
                body.append(r"\midrule")
            mine = {e.plan.row: (i, e) for i, e in enumerate(entries) if e.plan.group == group}
            cells = [measured(mine[r][1].values[m], mine[r][1].status, mine[r][0] in bold) if r in mine else "--"
                     for r in methods]
            papers = [paper(mine[r][1].plan.paper.get(m)) if r in mine else "--" for r in methods]
            label = escape(group) + (f" ({escape(METRIC_LABEL.get(m, m))})" if len(spec.metrics) > 1 else "")
            body.append(" & ".join([label, "measured", *cells]) + r" \\")
            body.append(" & ".join(["", "paper", *papers]) + r" \\")
            if m in claimed:
                per_row = {r: gain_cells(gains.of(mine[r][1]), m, verdicts) for r in mine}
                names = ["gain", "paper gain"] + (["verdict"] if verdicts else [])
                for j, name in enumerate(names):
                    body.append(" & ".join(["", name, *(per_row[r][j] if r in per_row else "--" for r in methods)])
                                + r" \\")
    return wrap(sweep, spec, "ll" + "r" * len(methods), header, body, entries, gains)


def latex_table(sweep: Sweep, spec: Spec, df: pd.DataFrame, entries: list[RowResults], gains: Gains | None) -> str:
    """The table as LaTeX, its gains read from `gains` (`report/gains.py`; None: no gain columns)."""
    if spec.layout == "wide":
        return wide_table(sweep, spec, entries, gains)
    return long_table(sweep, spec, df, entries, gains)
