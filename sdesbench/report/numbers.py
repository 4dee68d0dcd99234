"""How the reports print numbers: mean ± std over seeds."""
from __future__ import annotations

import statistics


def fmt(values: list[float], digits: int = 2) -> str:
    """'m' for one value, 'm ± s' (sample std) for several, '' for none."""
    if not values:
        return ""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def mean_or_none(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None
