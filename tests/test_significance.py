"""Knowing what is significant and pasting it into a paper: Welch's test over seeds and the per-image
paired bootstrap against hand-computed values, the report's comparison columns, the LaTeX table (compiled
when pdflatex is here), curves, and a report that never replaces a table with a poorer one."""
import json
import math
import shutil
import statistics
import subprocess

import numpy as np
import pytest
from scipy import stats as sps

from conftest import run_cli
from sdesbench.engine.record import ImageCounts, write_image_counts
from sdesbench.experiments.plan import Sweep
from sdesbench.report import ReportOptions, build_report
from sdesbench.report.curves import aggregate, curve_lines
from sdesbench.report.stats import miou_of_counts, paired_bootstrap, welch

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
    assert diff.excludes_zero
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


# ----------------------------------------------------------------------------- the report


def fake_run(plan, miou: float, counts: np.ndarray | None = None, history: list | None = None) -> None:
    """A completed run record (as the Trainer writes it) for a planned run, with optional counts and history."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    rec = {"status": "completed", "config_hash": plan.cfg.identity_hash(), "iterations": 40, "wall_time_s": 4.0,
           "peak_memory_mb": 100.0, "num_classes": 1, "metrics": {"miou": miou / 100, "pixel_acc": 0.9},
           "history": history or []}
    if counts is not None:
        rec["image_counts"] = write_image_counts(out, ImageCounts(["a.png", "b.png"], {"student": counts}))
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


def rows_of(md: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {r["Method"]: r for r in (dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
                                     for ln in lines[2:])}


def test_report_compares_each_row_with_its_student_row(results):
    written = build_report(Sweep("table4", "smoke", (0, 1, 2), results), ReportOptions(stats=True))
    rows = rows_of(written.md)
    ours, student = rows["L_SS + L_DPED + L_DFED"], rows["L_SS"]
    assert ours["mIoU"] == "70.80 ± 0.66" and student["mIoU"] == "69.43 ± 0.40"
    assert ours["vs Student mIoU (95% CI)"] == "+1.37 [+0.03, +2.71] *" and ours["p mIoU"] == "0.047"
    assert student["vs Student mIoU (95% CI)"] == "ref"
    assert rows["L_SS + L_DFED"]["vs Student mIoU (95% CI)"] == "—"  # never run
    # the bootstrap over the two images: +1/6 mIoU, interval [1/20, 1/4], the same images for every seed
    assert ours["vs Student mIoU (bootstrap 95% CI)"] == "+16.67 [+5.00, +25.00] *"
    assert ours["bootstrap p mIoU"] == "0.002"
    assert "Welch's t-test" in written.md and "paired bootstrap" in written.md
    # one seed: no Welch column, the bootstrap still answers
    one = rows_of(build_report(Sweep("table4", "smoke", (1,), results), ReportOptions(stats=True, force=True)).md)
    assert "vs Student mIoU (95% CI)" not in one["L_SS"]
    assert one["L_SS + L_DPED + L_DFED"]["vs Student mIoU (bootstrap 95% CI)"] == "+16.67 [+5.00, +25.00] *"


def test_latex_table_has_the_papers_layout_and_compiles(results, tmp_path):
    r = run_cli("report", "table4", "--seeds", "0,1,2", "--results", str(results), "--stats", "--format", "latex")
    assert r.returncode == 0, r.stderr
    md = (results / "table4-smoke.md").read_text()
    assert "vs Student mIoU (95% CI)" in md and "bootstrap p mIoU" in md
    tex = (results / "table4-smoke.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lcccrr}"):
        assert rule in tex, rule
    body = tex[tex.index(r"\midrule"):tex.index(r"\bottomrule")]
    lines = [ln for ln in body.splitlines() if ln.endswith(r"\\")]
    assert lines[0] == r"\multicolumn{6}{l}{\textit{EfficientNet-B0}} \\"
    cells = {ln.split(" & ")[0]: ln.split(" & ") for ln in lines[1:]}
    assert len(cells) == 5
    ours, student = cells[r"L\_SS + L\_DPED + L\_DFED"], cells[r"L\_SS"]
    assert ours[1:4] == [r"\checkmark{}"] * 3
    assert ours[4] == r"\textbf{70.80 $\pm$ 0.66}" and ours[5] == r"68.74 \\"  # best of the network, bold
    assert student[4] == r"69.43 $\pm$ 0.40" and student[5] == r"67.56 \\"
    assert cells[r"L\_SS + L\_DFED"][4] == r"\textit{missing}"
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed: structure checked, compilation not")
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs,amssymb}\n"
                                      f"\\begin{{document}}\n\\input{{{results / 'table4-smoke.tex'}}}\n"
                                      "\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


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
    # from the trained Student of its own network, which stays the solid Student line
    table3 = {ln.label: ln.style for ln in curve_lines(Sweep("table3", "smoke", (0,), results).plans())}
    assert table3["EfficientNet-B0 / Student"] == "-" and not any(k.startswith("teacher") for k in table3)
    styles = {ln.label: ln.style for ln in curve_lines(Sweep("table2", "smoke", (0,), results).plans())}
    assert styles["DeepLabV3-ResNet-50 (teacher) / Teacher"] == "--"  # the KL/AT/CWD teacher's own row
    assert styles["DeepLabV3-ResNet-18 / Ens-T (experts' ensemble)"] == ":"
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
