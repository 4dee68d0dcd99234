"""The gain a paper claims against the gain measured (report/gains.py), on a two-seed smoke table of Table 4
whose records are written here (no training): every number the report shows is recomputed from the records
with scipy (Welch's test) and the Welch-Satterthwaite interval written out, the claim from the spec's paper
numbers, the verdict by its rules as the header states them."""
import dataclasses
import json
import math
import statistics

import pytest
from scipy import stats as sps

from conftest import rows_of
from sdesbench.experiments.plan import Sweep
from sdesbench.experiments.spec import load_spec
from sdesbench.report.forest import forest_rows
from sdesbench.report.gains import verdict
from sdesbench.report.latex import latex_table
from sdesbench.report.stats import Difference
from sdesbench.report.tables import ReportOptions, write_table

STUDENT = "L_SS"
# mIoU (%) of the two seeds: a gain equal to the claim (+0.57), one below it (+0.81 claimed), one of the other
# sign (+1.18 claimed), and one too noisy to tell from 0 (+0.63 claimed)
MIOU = {STUDENT: [60.00, 60.04], "L_SS + L_DPED": [60.56, 60.62], "L_SS + L_DFED": [60.30, 60.36],
        "L_SS + L_DPED + L_DFED": [59.50, 59.56], "Rand split + L_DFED": [59.0, 61.6]}
EXPECTED = {"L_SS + L_DPED": "reproduced", "L_SS + L_DFED": "smaller", "L_SS + L_DPED + L_DFED": "contradicted",
            "Rand split + L_DFED": "not distinguishable from 0"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """table4 (smoke), seeds 0 and 1, a completed record per run; no sizes or costs (nothing profiled)."""
    res = tmp_path_factory.mktemp("gains")
    sweep = Sweep("table4", "smoke", (0, 1), res)
    spec = dataclasses.replace(load_spec("table4"), profile=None, cost=False)
    for plan in sweep.plans(spec):
        plan.out.mkdir(parents=True)
        (plan.out / "results.json").write_text(json.dumps(
            {"status": "completed", "config_hash": plan.cfg.identity_hash(), "iterations": 40, "num_classes": 1,
             "metrics": {"miou": MIOU[plan.row][plan.seed] / 100, "pixel_acc": 0.9}}))
    return sweep, spec, write_table(sweep, spec, ReportOptions(latex=True))


def by_hand(row: list[float], ref: list[float]) -> tuple[float, float, float, float]:
    """mean(row) - mean(ref), its Welch 95% interval (Welch-Satterthwaite df) and scipy's Welch p-value."""
    v1, v2 = statistics.variance(row) / len(row), statistics.variance(ref) / len(ref)
    df = (v1 + v2) ** 2 / (v1 ** 2 / (len(row) - 1) + v2 ** 2 / (len(ref) - 1))
    half = sps.t.ppf(0.975, df) * math.sqrt(v1 + v2)
    delta = statistics.fmean(row) - statistics.fmean(ref)
    return delta, delta - half, delta + half, float(sps.ttest_ind(row, ref, equal_var=False).pvalue)


def rule(claim: float, low: float, high: float) -> str:
    """The verdict's rules as the header states them, for a positive claim."""
    if low <= 0 <= high:
        return "not distinguishable from 0"
    if low <= claim <= high:
        return "reproduced"
    if high < 0:
        return "contradicted"
    return "smaller" if high < claim else "larger"


def test_the_report_has_claimed_and_measured_gains_verdicts_and_the_baseline_gap(report):
    sweep, spec, written = report
    records = {}  # row -> the mIoU of its seeds, read back from the records the report read
    for plan in sweep.plans(spec):
        records.setdefault(plan.row, []).append(
            100 * json.loads((plan.out / "results.json").read_text())["metrics"]["miou"])
    paper = {r.label: r.miou for r in spec.groups[0].rows}  # the spec's reference numbers
    rows = rows_of(written.md)
    csv = {r["Method"]: r for r in written.df.to_dict("records")}
    assert rows[STUDENT]["paper Δ Student mIoU"] == rows[STUDENT]["Δ Student mIoU"] == "ref"
    for label, expected in EXPECTED.items():
        delta, low, high, p = by_hand(records[label], records[STUDENT])
        claim = paper[label] - paper[STUDENT]
        assert rule(claim, low, high) == expected  # the records were made to show each verdict
        row = rows[label]
        assert row["paper Δ Student mIoU"] == f"{claim:+.2f}"
        assert row["Δ Student mIoU"] == f"{delta:+.2f}"
        star = " *" if low > 0 or high < 0 else ""
        assert row["vs Student mIoU (seeds: Welch 95% CI)"] == f"{delta:+.2f} [{low:+.2f}, {high:+.2f}]{star}"
        assert row["Welch p mIoU"] == f"{p:.3f}"
        assert row["verdict mIoU"] == expected
        assert {k: str(csv[label][k]) for k in row} == row  # the CSV holds the same cells
        gain = written.gains.of(written.entries[list(MIOU).index(label)]).gains["miou"]
        assert gain.measured == pytest.approx(delta, rel=1e-9) and gain.claimed == pytest.approx(claim, abs=1e-9)
        assert (gain.welch.low, gain.welch.high, gain.welch.p) == pytest.approx((low, high, p), rel=1e-6)
    # the header: every verdict's rule, and the baseline gap of the group, the first thing a reader must know
    header = written.md.split("|", 1)[0]
    for word in EXPECTED.values():
        assert f"`{word}`: " in header
    assert "`larger`: " in header
    gap = statistics.fmean(records[STUDENT]) - paper[STUDENT]
    assert gap < 0 and (f"- EfficientNet-B0: our L_SS is {-gap:.2f} lower than the paper's "
                        f"({statistics.fmean(records[STUDENT]):.2f} against {paper[STUDENT]:.2f} mIoU)." in header)
    # the forest plot and the LaTeX table read the same gains
    forest = {r.label: r for r in forest_rows(written.entries, written.gains, "miou")}
    assert {label: forest[label].verdict for label in EXPECTED} == EXPECTED
    assert forest["L_SS + L_DPED"].claimed == pytest.approx(paper["L_SS + L_DPED"] - paper[STUDENT])
    tex = latex_table(sweep, spec, written.df, written.entries, written.gains)
    assert rf"& \textit{{{EXPECTED['L_SS + L_DFED']}}} \\" in tex and rf"our $\mathcal{{L}}_{{SS}}$ is {-gap:.2f} lower" in tex


@pytest.mark.parametrize("claim, low, high, expected", [
    (1.0, 0.5, 1.5, "reproduced"), (1.0, 0.2, 0.8, "smaller"), (1.0, 1.2, 2.0, "larger"),
    (1.0, -2.0, -0.5, "contradicted"), (1.0, -0.5, 2.0, "not distinguishable from 0"),
    (-1.0, -1.5, -0.5, "reproduced"), (-1.0, -0.8, -0.2, "smaller"), (-1.0, -3.0, -2.0, "larger"),
    (-1.0, 0.2, 0.4, "contradicted"), (0.0, 0.2, 0.4, "larger"), (0.0, -0.4, -0.2, "larger"),
    (0.0, -0.1, 0.1, "not distinguishable from 0")])
def test_verdict_rules(claim, low, high, expected):
    assert verdict(claim, Difference((low + high) / 2, low, high, 0.01)) == expected
    assert verdict(None, Difference(0.5, low, high, 0.01)) is None and verdict(claim, None) is None


def test_dice_and_fscore_of_counts_are_the_confusion_matrix_s():
    """The bootstraps' mDice / mFscore of summed per-image counts equal the evaluation's (ConfusionMatrix),
    with a class never predicted right (F-score left out), one absent everywhere and one only predicted."""
    import numpy as np
    import torch

    from sdesbench.engine.metrics import ConfusionMatrix, image_counts
    from sdesbench.report.stats import METRICS_OF_COUNTS

    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (4, 6, 6), generator=gen)
    pred = torch.where(torch.rand(4, 6, 6, generator=gen) < 0.6, target, torch.randint(0, 5, (4, 6, 6), generator=gen))
    pred[pred == 2] = 4  # class 2 labelled, never predicted right; class 4 only predicted; class 5 nowhere
    target[0, 0, 0] = 255
    mat = ConfusionMatrix(6)
    mat.update(pred, target)
    counts = image_counts(pred, target, 6).sum(0).numpy()
    for metric in ("mdice", "mfscore", "miou", "macc"):
        assert float(METRICS_OF_COUNTS[metric](counts)) == pytest.approx(mat.compute()[metric], abs=1e-12), metric
    assert np.isfinite(METRICS_OF_COUNTS["mfscore"](np.zeros((3, 6))))  # nothing predicted right: 0, not NaN


def test_mdice_and_mfscore_columns_where_the_records_have_them(report, tmp_path):
    """A record of schema 6 gives mDice / mFscore columns (and their measured gains; no paper gives them); an
    older record says why its cell is missing."""
    sweep, spec, _ = report
    res = tmp_path / "res"
    for plan in sweep.plans(spec):
        if plan.row in (STUDENT, "L_SS + L_DPED"):
            rec = json.loads((plan.out / "results.json").read_text())
            if plan.row == STUDENT or plan.seed == 0:  # seed 1 of the other row: a record before schema 6
                rec["metrics"] |= {"mdice": 0.7 + plan.seed / 100, "mfscore": 0.6 + plan.seed / 100}
            out = res / plan.out.relative_to(sweep.results)
            out.mkdir(parents=True)
            (out / "results.json").write_text(json.dumps(rec))
    spec = dataclasses.replace(spec, metrics=["miou", "mdice", "mfscore"])
    rows = rows_of(write_table(dataclasses.replace(sweep, results=res), spec).md)
    assert rows[STUDENT]["mDice"] == "70.50 ± 0.71" and rows[STUDENT]["mFscore"] == "60.50 ± 0.71"
    ours = rows["L_SS + L_DPED"]
    assert ours["mDice"] == "70.00" and ours["Δ Student mDice"] == "-0.50" and "paper mDice" not in ours
    assert "recorded before sdesbench recorded mDice: record schema 6" in ours["status"]


def test_a_paper_number_on_another_split_is_shown_with_it_and_its_claim_is_over_its_own_student(tmp_path):
    """`paper_split` (CIRKD v2's Cityscapes *test* numbers in a val table): the paper cell names the split, `Δ` is
    `—` (a test number is never differenced with a val measurement), the claimed gain is the row's number minus the
    paper's own Student on that split, and the header says so."""
    sweep = Sweep("table4", "smoke", (0,), tmp_path)
    spec = dataclasses.replace(load_spec("table4"), profile=None, cost=False)
    row = spec.groups[0].rows[1]
    spec.groups[0].rows[1] = dataclasses.replace(row, miou=75.60, paper_split="test", paper_student_miou=73.56)
    for plan in sweep.plans(spec):
        plan.out.mkdir(parents=True)
        (plan.out / "results.json").write_text(json.dumps(
            {"status": "completed", "config_hash": plan.cfg.identity_hash(), "iterations": 40, "num_classes": 1,
             "metrics": {"miou": MIOU[plan.row][0] / 100, "pixel_acc": 0.9}}))
    written = write_table(sweep, spec, ReportOptions())
    cells = rows_of(written.md)[row.label]
    assert cells["paper mIoU"] == "75.60 (test)" and cells["Δ mIoU"] == "—"
    assert cells["paper Δ Student mIoU"] == f"{75.60 - 73.56:+.2f}" == "+2.04"
    assert cells["Δ Student mIoU"] == f"{MIOU[row.label][0] - MIOU[STUDENT][0]:+.2f}"
    assert f"{row.label}: the paper's number is on the **test** split" in written.md
