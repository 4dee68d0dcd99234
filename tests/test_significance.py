"""Knowing what is significant and pasting it into a paper: Welch's test over seeds, the per-image paired
bootstrap and the two-level (seeds x images) bootstrap against hand-computed values, an enumeration and a
re-implementation; stars only where the training noise is covered; the report's comparison columns and its
forest plot, the LaTeX table (compiled when pdflatex is here), curves, and a report that never replaces a
table with a poorer one."""
import dataclasses
import itertools
import json
import math
import shutil
import statistics
import subprocess

import numpy as np
import pytest
from scipy import stats as sps

from conftest import rows_of, run_cli
from sdesbench.engine.record import ImageCounts, write_image_counts
from sdesbench.experiments.plan import Sweep
from sdesbench.experiments.spec import load_spec
from sdesbench.report import ReportOptions, build_report
from sdesbench.report.curves import aggregate, curve_lines
from sdesbench.report.latex import caption, escape
from sdesbench.report.forest import CLAIMED_LABEL, forest_figure, forest_rows
from sdesbench.report.stats import (COVERS, miou_of_counts, paired_bootstrap, two_level_bootstrap, two_level_draws,
                                    welch)

ROW = [70.1, 70.9, 71.4]  # mIoU (%) of three seeds
REF = [69.0, 69.8, 69.5]


def test_welch_against_the_formula_by_hand_and_scipy():
    # by hand: means 70.8 and 69.4333; sample variances 0.86 / 2 = 0.43 and 0.32667 / 2 = 0.16333
    var_row, var_ref = 0.43, 0.98 / 6
    assert statistics.variance(ROW) == pytest.approx(var_row) and statistics.variance(REF) == pytest.approx(var_ref)
    delta = 70.8 - 208.3 / 3
    se2 = var_row / 3 + var_ref / 3  # Welch: s1^2/n1 + s2^2/n2
    df = se2**2 / ((var_row / 3) ** 2 / 2 + (var_ref / 3) ** 2 / 2)  # Welch-Satterthwaite
    assert df == pytest.approx(3.3278, abs=1e-4)
    t = delta / math.sqrt(se2)
    assert t == pytest.approx(3.0731, abs=1e-4)
    half = sps.t.ppf(0.975, df) * math.sqrt(se2)
    p = 2 * sps.t.sf(t, df)
    diff = welch(ROW, REF)
    assert diff.delta == pytest.approx(delta, abs=1e-12)
    assert (diff.low, diff.high) == pytest.approx((delta - half, delta + half), abs=1e-12)
    assert diff.p == pytest.approx(p, abs=1e-12) and diff.p == pytest.approx(0.047466, abs=1e-6)
    # scipy's own Welch test says the same
    ref = sps.ttest_ind(ROW, REF, equal_var=False)
    assert diff.p == pytest.approx(ref.pvalue, rel=1e-10)
    ci = ref.confidence_interval(0.95)
    assert (diff.low, diff.high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert diff.excludes_zero and diff.cell() == "+1.37 [+0.03, +2.71] *" and diff.p_cell() == "0.047"
    # the other way round: the interval mirrors, the p-value is the same
    back = welch(REF, ROW)
    assert (back.delta, back.low, back.high, back.p) == pytest.approx((-delta, -diff.high, -diff.low, diff.p))


def test_welch_needs_two_seeds_a_side_and_spread():
    assert welch([70.0], REF) is None and welch(ROW, [69.0]) is None
    flat = welch([70.0, 70.0], [69.0, 69.0])
    assert flat.delta == pytest.approx(1.0) and flat.p is None and flat.p_cell() == "—"


# One class, two images. IoU = TP / (TP + FP + FN) of the summed counts.
#   row:       A: 3/(3+1+0) = 3/4   B: 1/(1+1+2) = 1/4   A+B: 4/8 = 1/2
#   reference: A: 2/(2+1+1) = 1/2   B: 1/(1+2+2) = 1/5   A+B: 3/9 = 1/3
# A resample of two images is {A,A} (1/4 of draws), {A,B} (1/2) or {B,B} (1/4); doubling counts keeps a
# ratio, so the differences are 1/4, 1/6 and 1/20: all above zero.
ROW_COUNTS = np.array([[[3], [1], [0]], [[1], [1], [2]]])
REF_COUNTS = np.array([[[2], [1], [1]], [[1], [2], [2]]])
D_AA, D_AB, D_BB = 3 / 4 - 1 / 2, 1 / 2 - 1 / 3, 1 / 4 - 1 / 5


def test_paired_bootstrap_on_a_case_checked_by_hand(monkeypatch):
    assert miou_of_counts(ROW_COUNTS.sum(0)) == pytest.approx(0.5)
    draws = []
    from sdesbench.report import stats

    original = stats.resample_weights

    def spy(n, b, seed):
        w = original(n, b, seed)
        draws.append(w)
        return w

    monkeypatch.setattr(stats, "resample_weights", spy)
    diff = paired_bootstrap([ROW_COUNTS], [REF_COUNTS], draws=1000, seed=0)
    assert diff.delta == pytest.approx(D_AB)  # all images, once each
    (weights,) = draws
    both = (weights == 1).all(1).mean()
    only_a, only_b = (weights[:, 0] == 2).mean(), (weights[:, 1] == 2).mean()
    assert (only_a, both, only_b) == pytest.approx((0.25, 0.5, 0.25), abs=0.05)
    # each extreme holds ~25% of the draws, so the 2.5 and 97.5 percentiles are the extremes themselves
    assert (diff.low, diff.high) == pytest.approx((D_BB, D_AA))
    assert diff.p == pytest.approx(2 / 1001)  # no draw at or below zero: the smallest p of 1000 draws
    # it excludes 0, but it covers test-set noise only (one trained model a side): never a star
    assert diff.excludes_zero and not diff.starred and diff.cell() == "+0.17 [+0.05, +0.25]"
    # seeded: the same answer twice; another seed, other draws but the same extremes
    assert paired_bootstrap([ROW_COUNTS], [REF_COUNTS], draws=1000, seed=0) == diff


def test_paired_bootstrap_of_equal_rows_and_over_seeds():
    same = paired_bootstrap([REF_COUNTS], [REF_COUNTS])
    assert (same.delta, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0) and not same.excludes_zero
    # two seeds: the second has no difference, so every draw's difference is halved
    two = paired_bootstrap([ROW_COUNTS, REF_COUNTS], [REF_COUNTS, REF_COUNTS])
    assert two.delta == pytest.approx(D_AB / 2) and (two.low, two.high) == pytest.approx((D_BB / 2, D_AA / 2))
    with pytest.raises(ValueError):
        paired_bootstrap([ROW_COUNTS], [REF_COUNTS[:1]])


# ------------------------------------------------------------ the two-level bootstrap: seeds and test images


def iou_by_hand(counts: np.ndarray) -> float:
    """mIoU of images x 3 x C counts summed over the images, in plain Python: TP / (TP + FP + FN) averaged
    over the classes present."""
    ious = []
    for c in range(counts.shape[2]):
        tp, fp, fn = (int(sum(counts[i, k, c] for i in range(counts.shape[0]))) for k in range(3))
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return sum(ious) / len(ious) if ious else 0.0


def two_level_by_loops(row, ref, draws, seed):
    """The two-level bootstrap written out draw by draw: one image resample for every run, then each row's
    seeds, from one generator in the order the project documents (images, row seeds, reference seeds)."""
    rng = np.random.default_rng(seed)
    n_images = row[0].shape[0]
    image_picks = rng.integers(0, n_images, size=(draws, n_images))
    seed_picks = [rng.integers(0, len(runs), size=(draws, len(runs))) for runs in (row, ref)]
    diffs, image_diffs = [], []
    for b in range(draws):
        sides = []
        for runs, picks in zip((row, ref), seed_picks):
            per_seed = [iou_by_hand(run[image_picks[b]]) for run in runs]  # this draw's images, repeats counted
            mean = sum(per_seed) / len(runs)
            resampled = sum(per_seed[j] for j in picks[b]) / len(runs)
            sides.append((mean + math.sqrt(len(runs) / (len(runs) - 1)) * (resampled - mean), mean))
        diffs.append(sides[0][0] - sides[1][0])
        image_diffs.append(sides[0][1] - sides[1][1])
    return diffs, image_diffs


def test_two_level_bootstrap_agrees_with_a_loop_reimplementation():
    gen = np.random.default_rng(7)
    row = [gen.integers(0, 40, size=(7, 3, 3)) for _ in range(3)]  # three seeds, seven images, three classes
    ref = [gen.integers(0, 40, size=(7, 3, 3)) for _ in range(2)]  # two seeds
    diffs, image_diffs = two_level_by_loops(row, ref, draws=300, seed=5)
    got = two_level_draws(row, ref, draws=300, seed=5)
    assert got.diffs == pytest.approx(diffs, abs=1e-12) and got.image_diffs == pytest.approx(image_diffs, abs=1e-12)
    # the interval from the draws, by hand: delta +- t(nu) SE, nu Welch-Satterthwaite of the three parts
    row_all, ref_all = [iou_by_hand(a) for a in row], [iou_by_hand(b) for b in ref]
    delta = statistics.fmean(row_all) - statistics.fmean(ref_all)
    se = statistics.stdev(diffs)
    parts = [(statistics.variance(row_all) / 3, 2), (statistics.variance(ref_all) / 2, 1),
             (statistics.variance(image_diffs), 6)]
    nu = sum(v for v, _ in parts) ** 2 / sum(v**2 / df for v, df in parts)
    half = sps.t.ppf(0.975, nu) * se
    diff = two_level_bootstrap(row, ref, draws=300, seed=5)
    assert (diff.delta, diff.low, diff.high) == pytest.approx((delta, delta - half, delta + half), abs=1e-12)
    assert diff.p == pytest.approx(2 * sps.t.sf(abs(delta) / se, nu), abs=1e-12)
    # its image draws are the image-only bootstrap's (same seed): with the same seeds on both sides, the mean of
    # the per-seed differences on a draw is the difference of the seed means
    same_seeds = two_level_draws(row[:2], ref, draws=300, seed=5).image_diffs
    images_only = paired_bootstrap(row[:2], ref, draws=300, seed=5)
    assert (images_only.low, images_only.high) == pytest.approx(tuple(np.quantile(same_seeds, [0.025, 0.975])),
                                                                abs=1e-12)
    assert two_level_bootstrap(row[:1], ref) is None and two_level_bootstrap(row, ref[:1]) is None  # one seed a side


def test_two_level_bootstrap_distribution_by_enumeration():
    # two seeds a side, two images, one class. Every draw is one of 4 image picks x 4 row seed picks x 4
    # reference seed picks, each of the 64 with probability 1/64: the exact resampling distribution.
    row = [np.array([[[3], [1], [0]], [[1], [1], [2]]]), np.array([[[4], [0], [1]], [[2], [1], [1]]])]
    ref = [np.array([[[2], [1], [1]], [[1], [2], [2]]]), np.array([[[1], [2], [1]], [[2], [0], [2]]])]
    exact = {}
    for images in itertools.product(range(2), repeat=2):
        sides = []
        for runs in (row, ref):
            per_seed = [iou_by_hand(run[list(images)]) for run in runs]
            mean = sum(per_seed) / 2
            # picks (0,0) and (1,1) move the mean by +-(s0 - s1)/2, times sqrt(2); (0,1) and (1,0) leave it
            sides.append([mean + math.sqrt(2) * (sum(per_seed[j] for j in picks) / 2 - mean)
                          for picks in itertools.product(range(2), repeat=2)])
        for a in sides[0]:
            for b in sides[1]:
                key = round(a - b, 12)
                exact[key] = exact.get(key, 0) + 1 / 64
    draws = two_level_draws(row, ref, draws=20000, seed=3).diffs
    found = dict(zip(*np.unique(draws.round(12), return_counts=True)))
    assert set(found) <= set(exact)  # every draw is one of the enumerated values
    for value, prob in exact.items():  # each as often as its probability (4 binomial standard errors)
        assert found.get(value, 0) / 20000 == pytest.approx(prob, abs=4 * math.sqrt(prob * (1 - prob) / 20000))
    mean = sum(v * p for v, p in exact.items())
    var = sum((v - mean) ** 2 * p for v, p in exact.items())
    assert draws.var() == pytest.approx(var, rel=0.04)
    # with the images alike, the seed part alone: the variance is s_row^2 / 2 + s_ref^2 / 2 exactly (the
    # sqrt(n / (n - 1)) factor undoes the (n - 1) / n of resampling n values)
    flat_row, flat_ref = [np.stack([r[0], r[0]]) for r in row], [np.stack([r[0], r[0]]) for r in ref]
    s_row = statistics.variance([iou_by_hand(r) for r in flat_row])
    s_ref = statistics.variance([iou_by_hand(r) for r in flat_ref])
    seeds_only = two_level_draws(flat_row, flat_ref, draws=20000, seed=3).diffs
    assert seeds_only.var() == pytest.approx(s_row / 2 + s_ref / 2, rel=0.04)


def quality_counts(quality: np.ndarray, pixels: int = 1000) -> np.ndarray:
    """images x 3 x 1 counts of one class whose IoU on image i is quality[i] (pixels in the union each)."""
    tp = np.round(pixels * quality).astype(np.int64)
    fp = (pixels - tp) // 2
    return np.stack([tp, fp, pixels - tp - fp], axis=1)[:, :, None]


def runs_of(seed_levels: list[float], gen: np.random.Generator, n_images: int = 30, image_sd: float = 0.004,
            image_effect: np.ndarray | float = 0.0):
    """One run per seed: that seed's quality on every image plus `image_effect` (the row's own per-image
    advantage, the same for each of its seeds), plus a little per-image noise."""
    return [quality_counts(np.clip(level + image_effect + gen.normal(0, image_sd, n_images), 0.01, 0.99))
            for level in seed_levels]


def test_large_seed_variance_small_image_variance_gets_no_star():
    # the situation: seeds 10 points apart, each seed of the row 1.5 points below the same seed of the
    # Student; the test images barely move either
    gen = np.random.default_rng(0)
    row, ref = runs_of([0.45, 0.55], gen), runs_of([0.465, 0.565], gen)
    images = paired_bootstrap(row, ref)
    assert images.delta == pytest.approx(-0.015, abs=0.002)
    assert images.excludes_zero and not images.starred and "*" not in images.cell()  # would have been starred
    two = two_level_bootstrap(row, ref)
    assert two.low < 0 < two.high and not two.starred and "*" not in two.cell() and two.p > 0.5
    seeds = welch([iou_by_hand(a) for a in row], [iou_by_hand(b) for b in ref])
    assert seeds.low < 0 < seeds.high and not seeds.starred
    assert two.high - two.low > 10 * (images.high - images.low)  # the seeds, not the images, set the width


def test_a_difference_large_against_both_variances_is_starred():
    gen = np.random.default_rng(1)
    row, ref = runs_of([0.70, 0.72, 0.71], gen, image_sd=0.02), runs_of([0.50, 0.51], gen, image_sd=0.02)
    two = two_level_bootstrap(row, ref)
    assert two.delta == pytest.approx(0.205, abs=0.005)
    assert two.low > 0.1 and two.starred and two.cell().endswith(" *") and two.p < 0.01
    assert not paired_bootstrap(row[:2], ref).starred  # the image-only one never is, however clear


def test_two_level_stars_hold_their_level_with_two_seeds():
    # no difference at all (both rows drawn alike), two seeds a side, seeds spread 3 points, 10 images: how
    # often does a star appear? The percentiles of the draws star about one comparison in six (17%; without
    # the variance factor they would exclude 0 whenever both seeds of one row beat both of the other, one time
    # in three); the t-calibrated interval 2.5% (seeded, so these are the numbers every run gets).
    gen = np.random.default_rng(11)
    stars, percentile_stars = 0, 0
    trials = 400
    for _ in range(trials):
        row = runs_of(list(0.5 + gen.normal(0, 0.03, 2)), gen, n_images=10, image_sd=0.02)
        ref = runs_of(list(0.5 + gen.normal(0, 0.03, 2)), gen, n_images=10, image_sd=0.02)
        stars += two_level_bootstrap(row, ref, draws=300).starred
        low, high = np.quantile(two_level_draws(row, ref, draws=300).diffs, [0.025, 0.975])
        percentile_stars += low > 0 or high < 0
    assert stars / trials <= 0.08 and percentile_stars / trials >= 0.15


# ----------------------------------------------------------------------------- the report


def fake_run(plan, miou: float, counts: np.ndarray | None = None, history: list | None = None) -> None:
    """A completed run record (as the Trainer writes it) for a planned run, with optional counts and history."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    rec = {"status": "completed", "config_hash": plan.cfg.identity_hash(), "iterations": 40, "wall_time_s": 4.0,
           "peak_memory_mb": 100.0, "num_classes": 1, "metrics": {"miou": miou / 100, "pixel_acc": 0.9},
           "history": history or []}
    if counts is not None:
        ids = [f"{i}.png" for i in range(len(counts))]
        rec["image_counts"] = write_image_counts(out, ImageCounts(ids, {"student": counts}))
    (out / "results.json").write_text(json.dumps(rec))
    (out / "log.jsonl").write_text("".join(json.dumps({"iter": i, "lr": 0.01, "loss": 10.0 / i + plan.seed}) + "\n"
                                           for i in (10, 20, 30, 40)))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """table4 (smoke) with three seeds of L_SS (the Student row) and of SDES, counts and histories."""
    res = tmp_path_factory.mktemp("results")
    plans = {(p.row, p.seed): p for p in Sweep("table4", "smoke", (0, 1, 2), res).plans()}
    for seed in (0, 1, 2):
        fake_run(plans[("L_SS", seed)], REF[seed], REF_COUNTS,
                 [{"iteration": 20, "images": 2, "miou": 0.5 + seed / 100, "pixel_acc": 0.9},
                  {"iteration": 40, "images": 2, "miou": REF[seed] / 100, "pixel_acc": 0.9}])
        fake_run(plans[("L_SS + L_DPED + L_DFED", seed)], ROW[seed], ROW_COUNTS)
    return res


WELCH = "vs Student mIoU (seeds: Welch 95% CI)"
TWO_LEVEL = "vs Student mIoU (seeds + images: bootstrap 95% CI)"
IMAGES = "vs Student mIoU (test images only: bootstrap 95% CI)"


def test_report_compares_each_row_with_its_student_row(results):
    written = build_report(Sweep("table4", "smoke", (0, 1, 2), results), ReportOptions(stats=True))
    rows = rows_of(written.md)
    ours, student = rows["L_SS + L_DPED + L_DFED"], rows["L_SS"]
    assert ours["mIoU"] == "70.80 ± 0.66" and student["mIoU"] == "69.43 ± 0.40"
    assert ours[WELCH] == "+1.37 [+0.03, +2.71] *" and ours["Welch p mIoU"] == "0.047"
    assert student[WELCH] == student[TWO_LEVEL] == student[IMAGES] == "ref"
    assert rows["L_SS + L_DFED"][WELCH] == rows["L_SS + L_DFED"][TWO_LEVEL] == "—"  # never run
    # the image-only bootstrap over the two images: +1/6 mIoU, interval [1/20, 1/4], the same images for every
    # seed; it excludes 0 but covers test-set noise only: no star
    assert ours[IMAGES] == "+16.67 [+5.00, +25.00]" and ours["images only p mIoU"] == "0.002"
    # the two-level one over the three seeds of both rows (here all alike in their counts) and the images
    two = two_level_bootstrap([ROW_COUNTS] * 3, [REF_COUNTS] * 3).scaled(100)
    assert ours[TWO_LEVEL] == two.cell() and ours["seeds + images p mIoU"] == two.p_cell()
    assert "Welch's t-test" in written.md and "two-level bootstrap" in written.md
    assert "test-set noise only, training noise not included, so never starred" in written.md
    # one seed: no Welch or two-level column, the image-only bootstrap still answers, without a star
    one = rows_of(build_report(Sweep("table4", "smoke", (1,), results), ReportOptions(stats=True, force=True)).md)
    assert WELCH not in one["L_SS"] and TWO_LEVEL not in one["L_SS"]
    assert one["L_SS + L_DPED + L_DFED"][IMAGES] == "+16.67 [+5.00, +25.00]"


def test_latex_table_has_the_papers_layout_and_compiles(results, tmp_path):
    r = run_cli("report", "table4", "--seeds", "0,1,2", "--results", str(results), "--stats", "--format", "latex",
                "--plot")
    assert r.returncode == 0, r.stderr
    md = (results / "table4-smoke.md").read_text()
    assert WELCH in md and "images only p mIoU" in md
    assert (results / "table4-smoke-forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(results / "table4-smoke-forest.png") in r.stderr
    tex = (results / "table4-smoke.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lcccrrrrl}"):
        assert rule in tex, rule
    # loss names set as the paper sets them, in the header (the `show` columns) and the row labels
    header = tex[tex.index(r"\toprule"):tex.index(r"\midrule")].splitlines()[1]
    assert header == (r"Method & $\mathcal{L}_{SS}$ & $\mathcal{L}_{DPED}$ & $\mathcal{L}_{DFED}$ & "
                      r"mIoU & paper & gain & paper gain & verdict \\")
    body = tex[tex.index(r"\midrule"):tex.index(r"\bottomrule")]
    lines = [ln for ln in body.splitlines() if ln.endswith(r"\\")]
    assert lines[0] == (r"\multicolumn{9}{l}{\textit{EfficientNet-B0 -- our $\mathcal{L}_{SS}$ is 1.87 higher than the paper's "
                        r"(69.43 against 67.56 mIoU)}} \\")  # the gap of the baseline every gain is measured from
    cells = {ln.split(" & ")[0]: ln.split(" & ") for ln in lines[1:]}
    assert list(cells) == [r"$\mathcal{L}_{SS}$", r"$\mathcal{L}_{SS} + \mathcal{L}_{DPED}$",
                           r"$\mathcal{L}_{SS} + \mathcal{L}_{DFED}$",
                           r"$\mathcal{L}_{SS} + \mathcal{L}_{DPED} + \mathcal{L}_{DFED}$",
                           r"Rand split + $\mathcal{L}_{DFED}$"]
    assert r"L\_" not in tex  # no loss name left as text
    ours, student = cells[r"$\mathcal{L}_{SS} + \mathcal{L}_{DPED} + \mathcal{L}_{DFED}$"], cells[r"$\mathcal{L}_{SS}$"]
    assert ours[1:4] == [r"\checkmark{}"] * 3
    assert ours[4] == r"\textbf{70.80 $\pm$ 0.66}" and ours[5] == r"68.74"  # best of the network, bold
    assert student[4] == r"69.43 $\pm$ 0.40" and student[5] == r"67.56"
    # the gain (Welch interval), the paper's (68.74 - 67.56) and the verdict: the interval holds the claim
    assert ours[6:] == [r"+1.37 {\scriptsize [+0.03, +2.71]}", "+1.18", r"\textit{reproduced} \\"]
    assert student[6:] == ["ref", "ref", r" \\"]
    assert cells[r"$\mathcal{L}_{SS} + \mathcal{L}_{DFED}$"][4] == r"\textit{missing}"
    # the float numbers the table: the caption does not say "Table 4:" again
    (caption,) = [ln for ln in tex.splitlines() if ln.startswith(r"\caption{")]
    assert caption.startswith(r"\caption{Ablation of the loss terms, CamVid, DeepLabV3-EfficientNet-B0 (mIoU). ")
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed: structure checked, compilation not")
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs,amssymb}\n"
                                      f"\\begin{{document}}\n\\input{{{results / 'table4-smoke.tex'}}}\n"
                                      "\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


@pytest.mark.parametrize("text, tex", [
    ("L_SS", r"$\mathcal{L}_{SS}$"),
    ("L_SS + L_DPED", r"$\mathcal{L}_{SS} + \mathcal{L}_{DPED}$"),
    ("L_SS+L_DFED", r"$\mathcal{L}_{SS} + \mathcal{L}_{DFED}$"),
    ("Rand split + L_DFED (5%)", r"Rand split + $\mathcal{L}_{DFED}$ (5\%)"),
    ("weight of L_DPED, τ_T", r"weight of $\mathcal{L}_{DPED}$, $\tau$\_T"),
    ("KL_map, CTRL_X, L_SS_T", r"KL\_map, CTRL\_X, L\_SS\_T"),  # not loss names: text
])
def test_latex_escape_sets_loss_names_as_math(text, tex):
    assert escape(text) == tex


def test_latex_caption_drops_the_table_number_of_the_title(tmp_path):
    spec = load_spec("table4")
    sweep = Sweep("table4", "smoke", (0, 1), tmp_path)
    assert spec.title.startswith("Table 4: ")
    assert caption(sweep, spec).startswith("Ablation of the loss terms, CamVid, DeepLabV3-EfficientNet-B0 (mIoU). "
                                           r"Measured (preset \texttt{smoke}, seeds 0,1)")
    untitled = dataclasses.replace(spec, title="Ablation: Table 4 of the paper")  # only a leading number goes
    assert caption(sweep, untitled).startswith("Ablation: Table 4 of the paper. ")


def test_oracle_rows_are_marked_from_their_metric(tmp_path):
    """A row reporting Ens-T (spec `metric: ens_t`, whatever its label) carries the dagger in the Markdown and
    LaTeX tables, with one header (caption) line saying it routes pixels by the ground truth; no other row
    does, and a table without such a row has no such line. The CSV keeps the plain label."""
    from sdesbench.report.latex import latex_table
    from sdesbench.report.qualitative import column_title
    from sdesbench.report.tables import write_table

    spec = load_spec("table3")
    groups = [dataclasses.replace(g, rows=[dataclasses.replace(r, label="Experts") if r.metric == "ens_t" else r
                                           for r in g.rows]) for g in spec.groups]
    spec = dataclasses.replace(spec, profile=None, groups=groups)  # no sizes: nothing profiled
    sweep = Sweep("table3", "smoke", (0,), tmp_path)
    written = write_table(sweep, spec)
    methods = [ln.split("|")[2].strip() for ln in written.md.splitlines() if ln.startswith("|")][2:]
    assert methods.count("Experts †") == 1 and sum("†" in m for m in methods) == 1
    header = written.md.split("|", 1)[0]
    assert header.count("† Oracle, not a deployable model") == 1 and "ground-truth class mask" in header
    assert "Experts" in list(written.df["Method"]) and "Experts †" not in (tmp_path / "table3-smoke.csv").read_text()
    oracles = [r.label for r in forest_rows(written.entries, written.gains, "miou") if r.oracle]
    assert oracles == ["EfficientNet-B0 / Experts †"]  # the forest plot's line too, and its title's note
    title = forest_figure({"mIoU": forest_rows(written.entries, written.gains, "miou")}, "t")._suptitle.get_text()
    assert title == "t\n† oracle, not a deployable model: pixels routed to experts by their ground-truth class"
    tex = latex_table(sweep, spec, written.df, written.entries, written.gains)
    marked = [ln for ln in tex.splitlines() if r"$^\dagger$" in ln]
    assert len(marked) == 2 and marked[1].startswith(r"Experts $^\dagger$ & ")
    assert marked[0].startswith(r"\caption{") and r"$^\dagger$ Oracle, not a deployable model" in marked[0]
    plain = write_table(Sweep("table4", "smoke", (0,), tmp_path), load_spec("table4"))
    assert "†" not in plain.md and "Oracle" not in plain.md
    assert "dagger" not in latex_table(Sweep("table4", "smoke", (0,), tmp_path), load_spec("table4"), plain.df,
                                       plain.entries, plain.gains)
    # the prediction grid: the Ens-T column of a run says it is an oracle, the student's does not
    assert column_title("Ours\nsdes", "ens_t") == "Ours (Ens-T)\n(oracle: GT routing)\nsdes"
    assert column_title("Ours\nsdes", "student") == "Ours\nsdes"


def test_wide_latex_table_compiles(tmp_path):
    written = build_report(Sweep("table1", "smoke", (0,), tmp_path), ReportOptions(latex=True))
    tex = (tmp_path / "table1-smoke.tex").read_text()
    assert tex.count(" & measured & ") == 2 and tex.count(" & paper & ") == 2  # two networks
    assert "KL*" in tex and r"\textit{missing}" in tex and tmp_path / "table1-smoke.tex" in written.files
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed")
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs,amssymb}\n"
                                      "\\begin{document}\n\\input{table1-smoke.tex}\n\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_curves_are_the_mean_and_range_over_seeds(results):
    assert [a.tolist() for a in aggregate([{1: 1.0, 2: 3.0, 3: 9.0}, {1: 3.0, 2: 5.0}])] == \
        [[1, 2], [2.0, 4.0], [1.0, 3.0], [3.0, 5.0]]  # iterations both seeds have; mean, min, max
    lines = {ln.label: ln for ln in curve_lines(Sweep("table4", "smoke", (0, 1, 2), results).plans())}
    student = lines["L_SS"]
    assert student.curve and student.style == "-"
    x, mean, lo, hi = aggregate(student.vals)
    assert x.tolist() == [20, 40] and mean == pytest.approx([51.0, statistics.fmean(REF)])
    assert (lo[0], hi[0]) == pytest.approx((50.0, 52.0))
    x, mean, lo, hi = aggregate(student.losses)
    assert x.tolist() == [10, 20, 30, 40] and mean[0] == pytest.approx(2.0) and (lo[0], hi[0]) == (1.0, 3.0)
    ours = lines["L_SS + L_DPED + L_DFED"]
    assert not ours.curve and aggregate(ours.vals)[0].tolist() == [40]  # no history: the final point
    # Table 2: the ResNet-50 teacher is dashed, the Ens-T row dotted, the students solid; Table 3's KL* learns
    # from another trained copy of its Student (its own seed): a dashed teacher line beside the solid Student
    table3 = {ln.label: ln.style for ln in curve_lines(Sweep("table3", "smoke", (0,), results).plans())}
    assert table3["EfficientNet-B0 / Student"] == "-"
    assert [style for label, style in table3.items() if label.startswith("teacher")] == ["--"]
    same = load_spec("table3")
    same.teacher_seed = "same"  # the Student row itself teaches: drawn once, as the Student
    table3 = {ln.label: ln.style for ln in curve_lines(Sweep("table3", "smoke", (0,), results).plans(same))}
    assert table3["EfficientNet-B0 / Student"] == "-" and not any(k.startswith("teacher") for k in table3)
    styles = {ln.label: ln.style for ln in curve_lines(Sweep("table2", "smoke", (0,), results).plans())}
    assert styles["DeepLabV3-ResNet-50 (teacher) / Teacher"] == "--"  # the KL/AT/CWD teacher's own row
    assert styles["DeepLabV3-ResNet-18 / Ens-T (experts' ensemble) †"] == ":"  # an oracle: marked
    assert styles["DeepLabV3-ResNet-18 / Ours"] == styles["ERFNet / Student"] == "-"
    path = build_report(Sweep("table4", "smoke", (0, 1, 2), results), ReportOptions(curves=True)).files[-1]
    assert path.name == "table4-smoke-curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_keeps_a_table_with_more_measured_cells(results, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(results, res)
    sweep = Sweep("table4", "smoke", (0, 1, 2), res)
    build_report(sweep, ReportOptions(force=True))
    before = {p.name: p.read_bytes() for p in (res / "table4-smoke.md", res / "table4-smoke.csv")}
    # the same table without its runs (a fresh clone without records): nothing is replaced, one line says so
    shutil.rmtree(res / "runs")
    kept = build_report(sweep)
    assert kept.kept == (f"kept {res / 'table4-smoke.md'}: it holds 2 measured cell(s), the new table 0 (its runs "
                         "are not here); --force replaces it")
    assert kept.files == [] and {p: (res / p).read_bytes() for p in before} == before
    r = run_cli("report", "table4", "--seeds", "0,1,2", "--results", str(res))
    assert r.returncode == 0 and "wrote" not in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("note: ")] == [f"note: {kept.kept}"]
    assert {p: (res / p).read_bytes() for p in before} == before
    # --force replaces it
    forced = build_report(sweep, ReportOptions(force=True))
    assert forced.kept is None and "missing" in (res / "table4-smoke.md").read_text()


def test_sweep_pngs_are_kept_with_their_table(tmp_path):
    sweep = Sweep("fig3", "smoke", (0,), tmp_path)
    (tmp_path / "fig3-smoke.csv").write_text("param,value,mIoU,Ens-T mIoU\ngamma,0.5,13.35,15.73\n")
    (tmp_path / "fig3-smoke.png").write_bytes(b"kept")
    written = build_report(sweep)
    assert written.kept and (tmp_path / "fig3-smoke.png").read_bytes() == b"kept"
    assert not (tmp_path / "fig3-smoke-gamma.png").exists()


@pytest.fixture(scope="module")
def noisy_seeds(tmp_path_factory):
    """table4 (smoke), two seeds, per-image counts whose mIoU is the record's: the Student row (seeds 2
    points apart); a row 1 point below it, its seeds 10 points apart (no star anywhere); a row 19.5 points
    above it, seeds 1 point apart (starred by Welch and by the two-level bootstrap)."""
    res = tmp_path_factory.mktemp("noisy")
    plans = {(p.row, p.seed): p for p in Sweep("table4", "smoke", (0, 1), res).plans()}
    gen = np.random.default_rng(0)
    rows = {"L_SS": [0.50, 0.52], "L_SS + L_DPED + L_DFED": [0.45, 0.55], "L_SS + L_DPED": [0.70, 0.71]}
    counts = {}
    for name, levels in rows.items():
        counts[name] = runs_of(levels, gen)
        for seed, c in enumerate(counts[name]):
            fake_run(plans[(name, seed)], 100 * iou_by_hand(c), c)
    return res, counts


def test_report_stars_only_what_covers_the_seeds_and_draws_the_forest_plot(noisy_seeds):
    res, counts = noisy_seeds
    sweep = Sweep("table4", "smoke", (0, 1), res)
    written = build_report(sweep, ReportOptions(stats=True, plot=True, force=True))
    rows = rows_of(written.md)
    close, far = rows["L_SS + L_DPED + L_DFED"], rows["L_SS + L_DPED"]
    ref = counts["L_SS"]
    two = two_level_bootstrap(counts["L_SS + L_DPED + L_DFED"], ref).scaled(100)
    images = paired_bootstrap(counts["L_SS + L_DPED + L_DFED"], ref).scaled(100)
    assert close[TWO_LEVEL] == two.cell() and close[IMAGES] == images.cell() and "*" not in close[IMAGES]
    assert images.excludes_zero and two.low < 0 < two.high  # the old column would have starred it
    assert not any("*" in close[c] for c in (WELCH, TWO_LEVEL, IMAGES))
    assert far[WELCH].endswith(" *") and far[TWO_LEVEL].endswith(" *") and not far[IMAGES].endswith("*")
    # the forest plot: one line per row compared with the Student row, in table order, the table's numbers
    path = res / "table4-smoke-forest.png"
    assert path in written.files and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = forest_rows(written.entries, written.gains, "miou")
    assert [r.label for r in lines] == ["L_SS + L_DPED", "L_SS + L_DFED", "L_SS + L_DPED + L_DFED",
                                        "Rand split + L_DFED"]
    by_label = {r.label: r for r in lines}
    assert by_label["L_SS + L_DFED"].intervals == {}  # never run: drawn as "no interval"
    assert by_label["L_SS + L_DPED + L_DFED"].intervals["two_level"].cell() == close[TWO_LEVEL]
    fig = forest_figure({"mIoU": lines}, "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [r.tick for r in lines]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [COVERS["welch"], COVERS["two_level"],
                                                                   COVERS["images"], CLAIMED_LABEL]
    assert any(list(ln.get_xdata()) == [0, 0] for ln in ax.get_lines())  # the vertical line at 0
    stars = [t.get_text() for t in ax.texts if t.get_text() == "*"]
    assert len(stars) == 2  # Welch and two-level of the far row; nothing else excludes 0 with a star
    assert "no interval (a side lacks runs)" in [t.get_text() for t in ax.texts]
    # what covers 0: the close row's two-level interval is drawn across the line at 0
    low, high = ax.get_xlim()
    assert low < two.low and two.high < high


def test_forest_plot_without_intervals_says_so(noisy_seeds, tmp_path):
    res, _ = noisy_seeds
    one = build_report(Sweep("table4", "smoke", (0,), res), ReportOptions(plot=True, force=True))
    assert one.notes == ["no forest plot: no row has a difference to its Student row (that needs completed runs "
                         "on both sides, and two or more seeds or --stats)"]
    assert all("forest" not in str(f) for f in one.files)
    fig3 = build_report(Sweep("fig3", "smoke", (0,), tmp_path), ReportOptions(plot=True))
    assert "fig3 is a figure: no forest plot" in fig3.notes


def test_two_level_covers_test_images_that_favour_one_row():
    # no difference over the images the claim is about, but each test set (10 images, drawn anew per trial)
    # favours one row or the other (an advantage per image, mean 0 over all images, 5 points spread), the same
    # for every seed; five seeds a side, 1 point apart. Welch holds the test images fixed, so it answers "another
    # seed on these images" and stars 32.5% of these comparisons; the two-level bootstrap resamples the images
    # too and stars 4% (seeded: the numbers every run gets).
    gen = np.random.default_rng(12)
    trials, stars, welch_stars = 200, 0, 0
    for _ in range(trials):
        favour = gen.normal(0, 0.05, 10)
        row = runs_of(list(0.5 + gen.normal(0, 0.01, 5)), gen, n_images=10, image_sd=0.02, image_effect=favour)
        ref = runs_of(list(0.5 + gen.normal(0, 0.01, 5)), gen, n_images=10, image_sd=0.02)
        stars += two_level_bootstrap(row, ref, draws=300).starred
        welch_stars += welch([iou_by_hand(a) for a in row], [iou_by_hand(b) for b in ref]).starred
    assert stars / trials <= 0.1 and welch_stars / trials >= 0.2
