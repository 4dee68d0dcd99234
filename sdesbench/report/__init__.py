"""Reports: paper tables beside the measured numbers (`tables`, with size and cost `columns`) and the
Figure 3 sweep plots (`figures`). `write_report` writes whichever a table's spec asks for."""
from __future__ import annotations

from pathlib import Path

from sdesbench.experiments.plan import Sweep
from sdesbench.report.figures import write_sweep_figure
from sdesbench.report.tables import write_table


def write_report(sweep: Sweep) -> tuple[Path, str]:
    """results/<table>-<preset>.md and .csv (and the PNGs of a sweep spec); the Markdown path and text."""
    spec = sweep.spec()
    return write_sweep_figure(sweep, spec) if spec.is_sweep else write_table(sweep, spec)
