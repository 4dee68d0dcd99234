"""The gain a paper claims against the gain measured: every comparison a report shows, computed once.

A KD paper claims a **gain**: its row minus its own Student row (the same network trained without
distillation). For each row of a table and each metric this module computes, against its group's
Student row (`reference_rows`) and, with `--against`, against the row that names (`named_rows`):

- the claimed gain: the paper's row − the paper's Student row (the spec's reference numbers), where the
  paper gives both;
- the measured gain: the row's mean over seeds − the Student row's, with, per test the report runs
  (`comparison_tests`), its 95% interval and p-value (`report/stats.py`: Welch over seeds with two or more
  seeds a side; with `--stats` the two-level and image-only bootstraps of the per-image counts);
- a verdict (`verdict`, `VERDICTS`) comparing the two on the Welch interval, with two or more seeds on both
  rows and the paper's numbers for both;
- with `run --compute-matched`, the measured gain against the Student of equal compute (`matched_rows`: the
  group's Student trained for as long as the row's cost class; the plain Student for a class of 1.00), with
  the same tests: a gain that vanishes there was bought with compute, not with distillation;
- per group, the measured Student row against the paper's (`Baseline`): a baseline that trains higher than
  the paper's shrinks every gain measured from it, so it is the first thing a reader must know.

The Markdown/CSV tables (`tables.py`), the LaTeX table (`latex.py`) and the forest plot (`forest.py`) all
read the one `Gains` that `compare` returns, so they cannot disagree.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np

from sdesbench.engine.record import read_image_counts
from sdesbench.errors import StorageError
from sdesbench.experiments.spec import Row
from sdesbench.report.rows import RowResults
from sdesbench.report.stats import Difference, paired_bootstrap, two_level_bootstrap, welch

STUDENT = "Student"  # what the columns comparing with each group's Student row call it

# The verdicts, in the order the header states their rules. `claim` is the paper's gain, `CI` the measured
# gain's Welch 95% interval over seeds.
REPRODUCED, SMALLER, LARGER, CONTRADICTED, NULL = ("reproduced", "smaller", "larger", "contradicted",
                                                    "not distinguishable from 0")
VERDICTS = {REPRODUCED: "the CI excludes 0 and contains the claim",
            SMALLER: "the CI excludes 0, is on the claim's side of 0 and lies closer to 0 than the claim",
            LARGER: "the CI excludes 0, is on the claim's side of 0 and lies farther from 0 than the claim "
                    "(with a claim of 0: any CI that excludes 0)",
            CONTRADICTED: "the CI excludes 0 on the other side of 0 from the claim",
            NULL: "the CI contains 0"}


def verdict(claimed: float | None, interval: Difference | None) -> str | None:
    """The verdict on a claimed gain from the measured gain's interval (`VERDICTS`); None without either."""
    if claimed is None or interval is None:
        return None
    if not interval.excludes_zero:
        return NULL
    if interval.low <= claimed <= interval.high:
        return REPRODUCED
    side = 1.0 if interval.low > 0 else -1.0  # mirror a negative interval, so "farther from 0" is "above"
    low, high, claim = sorted((side * interval.low, side * interval.high)) + [side * claimed]
    if claim < 0:
        return CONTRADICTED
    return SMALLER if high < claim else LARGER


@dataclass(frozen=True)
class Gain:
    """One row against one reference row of its group, for one metric, in points."""

    measured: float | None  # the row's mean − the reference's (any number of seeds); None without runs on a side
    tests: dict[str, Difference | None]  # test (`comparison_tests`) -> its interval and p; None: a side lacks runs
    claimed: float | None  # the paper's row − the paper's reference row; None where the paper lacks either
    verdict: str | None  # `verdict(claimed, tests["welch"])`

    @property
    def welch(self) -> Difference | None:
        return self.tests.get("welch")


@dataclass(frozen=True)
class Comparison:
    """A row against its group's reference row: `is_reference` on that row itself (no gains), no gains in a
    group without one; otherwise metric -> `Gain`."""

    is_reference: bool = False
    gains: dict[str, Gain] = field(default_factory=dict)


@dataclass(frozen=True)
class Baseline:
    """A group's Student row, measured and in the paper: `gap(metric)` = measured mean − paper."""

    group: str
    label: str
    values: dict[str, list[float]]
    paper: dict[str, float]

    def measured(self, metric: str) -> float | None:
        values = self.values.get(metric) or []
        return statistics.fmean(values) if values else None

    def gap(self, metric: str) -> float | None:
        mine, theirs = self.measured(metric), self.paper.get(metric)
        return mine - theirs if mine is not None and theirs is not None else None

    def sentence(self, metric: str, label: str) -> str:
        """'our Baseline is 1.90 higher than the paper's (76.11 against 74.21 mIoU)' (the row's label), or why
        there is no gap."""
        mine, theirs, gap = self.measured(metric), self.paper.get(metric), self.gap(metric)
        if mine is None:
            return f"no completed run of our {self.label}, the paper's is {theirs:.2f} {label}" if theirs is not None \
                else f"no completed run of our {self.label}, no number in the paper"
        if gap is None:
            return f"our {self.label} has {mine:.2f} {label}, the paper gives no number"
        how = "equal to" if round(gap, 2) == 0 else f"{abs(gap):.2f} {'higher' if gap > 0 else 'lower'} than"
        return f"our {self.label} is {how} the paper's ({mine:.2f} against {theirs:.2f} {label})"


@dataclass
class Gains:
    """Every comparison of a table: each row (by key) against its group's Student row and, with `against`,
    against the row it names; the tests shown; each group's `Baseline`."""

    metrics: tuple[str, ...]
    tests: list[str]
    student: dict[str, Comparison]
    baselines: dict[str, Baseline]
    against: str | None = None  # the `--against` name (label or group/label key)
    versus_against: dict[str, Comparison] = field(default_factory=dict)
    versus_matched: dict[str, Comparison] = field(default_factory=dict)  # `--compute-matched`: rows with a cost class

    def of(self, entry: RowResults, against: bool = False, matched: bool = False) -> Comparison:
        """The row's comparison with its group's Student row, or (`against`) with the `--against` row, or
        (`matched`) with the Student of equal compute."""
        chosen = self.versus_matched if matched else self.versus_against if against else self.student
        return chosen.get(entry.plan.key, Comparison())

    @property
    def compute_matched(self) -> bool:
        """Whether the table has equal-compute comparisons (`run --compute-matched`)."""
        return bool(self.versus_matched)

    @property
    def has_student(self) -> bool:
        """Whether any group has a Student row (no gain columns otherwise)."""
        return bool(self.baselines)

    @property
    def verdicts(self) -> bool:
        """Whether the table has verdicts: Welch intervals (two or more seeds) and a claim for some row."""
        return "welch" in self.tests and any(g.claimed is not None for c in self.student.values()
                                             for g in c.gains.values())


def reference_rows(entries: list[RowResults]) -> dict[str, RowResults]:
    """Each group's Student row: its first row training the plain student and reporting the student."""
    refs: dict[str, RowResults] = {}
    for e in entries:
        if e.plan.method == "student" and e.plan.metric_source == "student":
            refs.setdefault(e.plan.group, e)
    return refs


def named_rows(entries: list[RowResults], name: str) -> dict[str, RowResults]:
    """Each group's row that `name` names: its label (`CIRKD`, in every group that has one) or its key
    (`DeepLabV3-ResNet-18/CIRKD`, that group only)."""
    return {e.plan.group: e for e in entries if name in (e.plan.row, e.plan.key)}


def matched_rows(entries: list[RowResults]) -> dict[tuple[str, float], RowResults]:
    """(group, cost class) -> the group's Student of equal compute: a compute-matched Student row for a class
    above or below 1.00, the group's Student row for 1.00 (it is the same run)."""
    out = {(g, 1.0): e for g, e in reference_rows(entries).items()}
    for e in entries:
        if e.plan.matches is not None:
            out.setdefault((e.plan.group, e.plan.matches), e)
    return out


def against_label(name: str) -> str:
    """What the columns comparing with the `--against` row call it: its label."""
    return name.rsplit("/", 1)[-1]


def comparison_tests(seeds: bool, stats: bool) -> list[str]:
    """The tests a table shows: Welch with two or more seeds; with `stats` the two-level bootstrap (two
    or more seeds) and the image-only one."""
    return (["welch"] if seeds else []) + ((["two_level"] if seeds else []) + ["images"] if stats else [])


def seed_counts(entry: RowResults, source: str) -> dict[int, tuple[list[str], np.ndarray]]:
    """seed -> (image ids, images x 3 x C counts of prediction `source`) of the row's completed runs."""
    out = {}
    for plan, rec in entry.records:
        try:
            counts = read_image_counts(plan.out, rec)
        except StorageError:
            continue
        if counts is not None and source in counts.counts:
            out[plan.seed] = (counts.image_ids, counts.counts[source])
    return out


def shared_counts(entry: RowResults, ref: RowResults) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """seed -> counts of the row's and of the reference row's runs, those scored on the reference row's images
    (the ids of its first seed with counts); a run scored on other images is left out."""
    mine, theirs = seed_counts(entry, entry.plan.metric_source), seed_counts(ref, ref.plan.metric_source)
    if not theirs:
        return {}, {}
    ids = theirs[min(theirs)][0]
    return ({s: c for s, (i, c) in mine.items() if i == ids}, {s: c for s, (i, c) in theirs.items() if i == ids})


def intervals(entry: RowResults, ref: RowResults, metric: str, tests: list[str]) -> dict[str, Difference | None]:
    """The row's difference to the reference row in points, per test: Welch over seeds; the two-level bootstrap
    over all seeds of both rows; the image-only one over the seeds both rows have (seed s against seed s)."""
    out: dict[str, Difference | None] = {}
    if "welch" in tests:
        out["welch"] = welch(entry.values[metric], ref.values[metric])
    if "two_level" not in tests and "images" not in tests:
        return out
    mine, theirs = shared_counts(entry, ref)
    if "two_level" in tests:
        two = two_level_bootstrap(list(mine.values()), list(theirs.values()), metric) if mine and theirs else None
        out["two_level"] = two.scaled(100) if two else None
    both = sorted(s for s in mine if s in theirs)
    image = paired_bootstrap([mine[s] for s in both], [theirs[s] for s in both], metric) if both else None
    out["images"] = image.scaled(100) if image else None
    return out


def other_split(entry: RowResults) -> Row | None:
    """The row's spec when the paper's numbers for it are on another split than the table's (`Row.paper_split`)."""
    row = entry.plan.row_spec
    return row if row is not None and row.paper_split else None


def gain(entry: RowResults, ref: RowResults, metric: str, tests: list[str]) -> Gain:
    """The row's `Gain` over the reference row for one metric."""
    mine, theirs = entry.values[metric], ref.values[metric]
    measured = statistics.fmean(mine) - statistics.fmean(theirs) if mine and theirs else None
    paper_row, paper_ref = entry.plan.paper.get(metric), ref.plan.paper.get(metric)
    split = other_split(entry)
    if split is not None:  # the paper's row is on another split: its claim is over its own Student there
        paper_ref = split.paper_student_miou if metric == "miou" else None
    claimed = paper_row - paper_ref if paper_row is not None and paper_ref is not None else None
    found = intervals(entry, ref, metric, tests)
    return Gain(measured, found, claimed, verdict(claimed, found.get("welch")))


def compared_with(entry: RowResults, ref: RowResults | None, metrics: tuple[str, ...],
                  tests: list[str]) -> Comparison:
    """The row against `ref` (its group's Student row, or the `--against` row): the Student row's comparison
    and the `--against` row's are the same computation."""
    if ref is None or ref is entry:
        return Comparison(is_reference=ref is entry)
    return Comparison(gains={m: gain(entry, ref, m, tests) for m in metrics})


def compare(entries: list[RowResults], metrics: tuple[str, ...], stats: bool = False,
            against: str | None = None) -> Gains:
    """Every row against its group's Student row (and the `against` row): the tests a table with these rows
    shows (Welch when some row has two or more seeds; the bootstraps with `stats`), the gains, the verdicts and
    each group's baseline."""
    several_seeds = max((len(e.runs) for e in entries), default=0) >= 2
    tests = comparison_tests(several_seeds, stats)
    refs = reference_rows(entries)
    student = {e.plan.key: compared_with(e, refs.get(e.plan.group), metrics, tests) for e in entries}
    baselines = {group: Baseline(group, ref.plan.row, {m: ref.values[m] for m in metrics},
                                 {m: v for m, v in ref.plan.paper.items() if v is not None})
                 for group, ref in refs.items()}
    named = named_rows(entries, against) if against else {}
    versus = {e.plan.key: compared_with(e, named.get(e.plan.group), metrics, tests) for e in entries} if against \
        else {}
    equal = matched_rows(entries) if any(e.plan.matches is not None for e in entries) else {}
    matched = {e.plan.key: compared_with(e, equal.get((e.plan.group, e.plan.cost_class)), metrics, tests)
               for e in entries if e.plan.cost_class is not None}
    return Gains(metrics, tests, student, baselines, against, versus, matched)
