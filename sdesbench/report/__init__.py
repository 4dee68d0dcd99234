"""Reports: paper tables beside the measured numbers (`tables`, with size and cost `columns` and the
significance tests of `stats`), the Figure 3 sweep plots (`figures`), the LaTeX table (`latex`),
training curves (`curves`), the forest plot of the differences to the Student rows (`forest`) and grids
of predictions (`qualitative`). Every gain over a Student row, claimed and measured, with its intervals and
verdict, is computed once (`gains`, from the rows `rows` reads) and read by the tables, LaTeX and forest plot. `build_report` writes whichever a table's spec and the options ask for."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from sdesbench.errors import CheckpointError, ConfigError
from sdesbench.experiments.plan import Sweep
from sdesbench.io import write_text
from sdesbench.report.figures import write_sweep_figure
from sdesbench.report.tables import ReportOptions, Written, check_checkpoint, write_table

__all__ = ["ReportOptions", "Written", "build_report"]


def build_report(sweep: Sweep, options: ReportOptions | None = None) -> Written:
    """results/<table>-<preset>.md and .csv (and the PNGs of a sweep spec), plus what `options` ask for:
    `.tex`, `-curves.png`, `-forest.png`, `-qualitative.png`. The extras are written even when the table is kept."""
    from sdesbench.report.curves import write_curves
    from sdesbench.report.forest import write_forest
    from sdesbench.report.latex import latex_table
    from sdesbench.report.qualitative import write_table_grid

    options = options or ReportOptions()
    spec = sweep.spec()
    if options.columns and not spec.is_sweep:  # the metrics `--columns` names, in every output of the table
        spec = dataclasses.replace(spec, metrics=list(options.metrics(spec)))
    check_checkpoint(options, spec)  # before anything is written: a best table mixes in no last-checkpoint numbers
    written = write_sweep_figure(sweep, spec, options) if spec.is_sweep else write_table(sweep, spec, options)
    if options.latex and spec.is_sweep:
        written.notes.append(f"{sweep.table} is a figure: no LaTeX table")
    elif options.latex:
        tex = Path(sweep.results) / f"{sweep.name}-{sweep.preset}.tex"
        write_text(tex, latex_table(sweep, spec, written.df, written.entries, written.gains))
        written.files.append(tex)
    if options.curves:
        written.files.append(write_curves(sweep, spec))
    if options.plot and spec.is_sweep:
        written.notes.append(f"{sweep.table} is a figure: no forest plot")
    elif options.plot:
        forest = write_forest(sweep, spec, written.entries, written.gains)
        if forest is None:
            written.notes.append("no forest plot: no row has a difference to its Student row (that needs completed "
                                 "runs on both sides, and two or more seeds or --stats)")
        else:
            written.files.append(forest)
    if options.qualitative:
        try:
            written.files.append(write_table_grid(sweep, spec, options.qualitative, options.rows))
        except (CheckpointError, ConfigError) as e:  # a table without trained checkpoints here: said, not fatal
            written.notes.append(f"no qualitative grid: {e}")
    return written

