"""Paper tables: specs, `run --dry-run`, run -> report -> rerun, `ablate` -> `report fig3`, statuses.

Rows whose model/method is not implemented yet are skipped with a reason; the assertions hold both
now and once they exist (a measured cell is a number or an explicit status, never a silent zero).
"""
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, assert_one_line_error, run_cli
from sdesbench.errors import ConfigError
from sdesbench.experiments.plan import Sweep
from sdesbench.experiments.spec import PRESETS, list_tables, load_spec
from sdesbench.experiments.sweeps import parse_sweep_values, sweep_spec
from sdesbench.report import build_report

# every run as short as possible: the tests check plumbing, not accuracy
SHORT = ["--set", "train.iters=2", "--set", "data.crop=48", "--set", "data.batch_size=2", "--set", "eval.max_images=4"]
SHORT_SETS = [SHORT[i + 1] for i in range(0, len(SHORT), 2)]
STATUS_WORDS = {"skipped", "missing", "failed", "interrupted"}
PAPER_TABLES = ROOT.parent / "shared" / "paper" / "tables.yaml"
PAPER_TEXT = ROOT.parent / "shared" / "paper" / "sdes-aaai2023.txt"
NUMBER = re.compile(r"^-?\d+\.\d+( ± \d+\.\d+)?$")


def write_table(sweep: Sweep) -> tuple[Path, str]:
    written = build_report(sweep)
    return written.md_path, written.md


def md_rows(md: str) -> list[dict[str, str]]:
    """The first Markdown table of a report as dicts (header -> cell)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


SDES_TABLES = ("table1", "table2", "table3", "table4", "fig3")  # the SDES paper's protocol


def test_every_spec_expands_in_every_preset(tmp_path):
    assert set(SDES_TABLES) <= set(list_tables())
    for table in list_tables():
        spec = load_spec(table)
        assert {"paper", "smoke"} <= set(spec.presets), table
        for preset in [p for p in PRESETS if p in spec.presets]:  # the CIRKD-style tables have no `mini`
            plans = Sweep(table, preset, (0, 1), tmp_path).plans(spec)
            assert plans, (table, preset)
            for p in plans:
                # each planned run either has a validated config or says why it cannot run
                assert (p.cfg is None) == bool(p.skipped), (table, preset, p.key, p.skipped)
                assert {"iters", "crop", "batch", "lr"} <= set(p.protocol), (table, p.key)
                if p.cfg is not None:
                    assert Path(p.cfg.output.dir).name == p.cfg.identity_hash()
        if table not in SDES_TABLES:
            continue  # other protocols: tests/test_datasets_cirkd.py
        paper = spec.presets["paper"]
        iters = {"voc": 30000, "cityscapes": 45000, "camvid": 5000}[spec.dataset]
        assert paper.train["iters"] == iters and paper.data["crop"] == [512, 512]
        assert paper.data["batch_size"] == 8 and paper.train["lr"] == 0.01


@pytest.mark.skipif(not PAPER_TABLES.is_file(), reason="../shared/paper/tables.yaml is absent")
def test_spec_numbers_are_the_papers():
    ref = yaml.safe_load(PAPER_TABLES.read_text())
    t1 = {g.model: {r.label: r.miou for r in g.rows} for g in load_spec("table1").groups}
    assert t1 == ref["table1"]["rows"]
    t2 = {g.model: {r.label.replace(" ", "-"): r for r in g.rows} for g in load_spec("table2").groups}
    for model, entry in ref["table2"]["rows"].items():
        for label, vals in entry["results"].items():
            assert t2[model][label].miou == vals["miou"], (model, label)
            assert t2[model][label].pa == vals.get("pa"), (model, label)
    assert t2["deeplabv3_resnet50"]["Teacher"].miou == ref["table2"]["teacher"]["miou"]
    t3 = {g.model: {r.label: r.miou for r in g.rows} for g in load_spec("table3").groups}
    assert t3 == {m: e["results"] for m, e in ref["table3"]["rows"].items()}
    assert [r.miou for r in load_spec("table4").groups[0].rows] == [67.56, 68.13, 68.37, 68.74, 68.19]
    fig3 = load_spec("fig3").sweeps
    for param, ref_sweep in ref["figure3"].items():
        lo, hi = ref_sweep["range"]
        assert min(fig3[param].values) == lo and max(fig3[param].values) == hi, param


def test_dry_run_table2_paper_lists_protocol_and_teacher(tmp_path):
    r = run_cli("run", "table2", "--preset", "paper", "--dry-run", "--results", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if "DeepLabV3-ResNet-18/" in ln]
    labels = ["Student", "Ens-T", "LSR", "Tf-KD", "SAD", "SR-SS", "Tf-FD", "KL", "AT", "CWD", "Ours w/o DFED",
              "Ours w/o DPED", "Ours"]
    for label in labels:
        assert any(f"DeepLabV3-ResNet-18/{label} " in ln for ln in rows), label
    for ln in rows + [ln for ln in r.stdout.splitlines() if "teacher:deeplabv3_resnet50" in ln]:
        cells = [c.strip() for c in ln.split("│")]
        assert "45000" in cells and "512x512" in cells and "8" in cells, ln
    for label in ("KL", "AT", "CWD"):
        (ln,) = [ln for ln in rows if f"DeepLabV3-ResNet-18/{label} " in ln]
        assert "deeplabv3_resnet50" in ln  # the teacher dependency
    assert any("teacher:deeplabv3_resnet50" in ln for ln in r.stdout.splitlines())
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_table4_smoke_run_report_and_rerun_trains_nothing(tmp_path):
    res = ["--results", str(tmp_path)]
    first = run_cli("run", "table4", "--preset", "smoke", "--seeds", "0", *res, *SHORT, "--no-progress")
    assert first.returncode == 0, first.stderr
    (tmp_path / "table4-smoke.md").unlink()  # `run` writes the report; `report` (in-process here) rewrites it
    write_table(Sweep("table4", "smoke", (0,), tmp_path, tuple(SHORT_SETS)))
    md = (tmp_path / "table4-smoke.md").read_text()
    assert (tmp_path / "table4-smoke.csv").is_file()
    rows = md_rows(md)
    assert [float(r["paper mIoU"]) for r in rows] == [67.56, 68.13, 68.37, 68.74, 68.19]
    assert "Δ mIoU" in rows[0]
    plans = {p.row: p for p in Sweep("table4", "smoke", (0,), tmp_path, tuple(SHORT_SETS)).plans()}
    for row in rows:
        cell = row["mIoU"]
        assert NUMBER.match(cell) or cell in STATUS_WORDS, cell
        if NUMBER.match(cell):  # measured = 100 x the run's recorded mIoU; Δ = measured - paper
            rec = json.loads((plans[row["Method"]].out / "results.json").read_text())
            assert float(cell) == pytest.approx(100 * rec["metrics"]["miou"], abs=0.005)
            assert float(row["Δ mIoU"]) == pytest.approx(100 * rec["metrics"]["miou"] - float(row["paper mIoU"]),
                                                         abs=0.011)
        else:
            assert row["Δ mIoU"] == "—" and row["status"].startswith(cell), row
    assert NUMBER.match(rows[0]["mIoU"])  # the L_SS row (the student) always runs
    # a second identical run trains nothing and leaves every run folder untouched
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    again = run_cli("run", "table4", "--preset", "smoke", "--seeds", "0", *res, *SHORT, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "0 run(s) to train" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()} == files


def test_ablate_gamma_then_report_fig3_writes_png(tmp_path):
    res = ["--results", str(tmp_path)]
    r = run_cli("ablate", "--param", "gamma", "--values", "0.3,0.5", "--preset", "smoke", *res, *SHORT,
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "gamma sweep:" in r.stderr
    rep = run_cli("report", "fig3", "--preset", "smoke", *res, *SHORT)
    assert rep.returncode == 0, rep.stderr
    png = tmp_path / "fig3-smoke-gamma.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "fig3-smoke.png").is_file()
    rows = [r for r in md_rows((tmp_path / "fig3-smoke.md").read_text()) if r["param"] == "gamma"]
    # the spec's gamma values plus the one ablate added (0.3)
    assert sorted(float(r["value"]) for r in rows) == [0.0, 0.25, 0.3, 0.5, 0.75, 1.0]
    for row in rows:
        assert NUMBER.match(row["mIoU"]) or row["mIoU"] in STATUS_WORDS, row


def test_ablate_bad_input_is_one_line(tmp_path):
    assert_one_line_error(run_cli("ablate", "--param", "gamma", "--values", "0.5,1.5", "--results", str(tmp_path)),
                          "gamma=1.5 is out of range [0, 1]")


@pytest.mark.parametrize("param,values,needle", [
    ("delta", None, "unknown sweep parameter 'delta'"),
    ("N", "2.5", "expects comma-separated integers"),
    ("alpha", "-1", "alpha=-1.0 is out of range"),
    ("beta", "1,,x", "got 'x'"),
])
def test_sweep_values_are_validated(param, values, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_sweep_values(load_spec("fig3"), param, values)


def write_record(out: Path, cfg, **fields) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rec = {"config_hash": cfg.identity_hash(), "iterations": 10, "wall_time_s": 2.0, "peak_memory_mb": 100.0,
           **fields}
    (out / "results.json").write_text(json.dumps(rec))


def test_failed_missing_and_multi_seed_cells(tmp_path):
    plans = [p for p in Sweep("table3", "smoke", (0, 1, 2, 3), tmp_path).plans() if p.key == "EfficientNet-B0/Student"]
    s0, s1, s2, s3 = plans
    # two completed seeds: mean ± sample std of 50 and 60 = 55.00 ± 7.07; Δ = 55 - 67.56 = -12.56
    write_record(s0.out, s0.cfg, status="completed", metrics={"miou": 0.50, "pixel_acc": 0.9})
    # seed 1 measured its wall time (schema 4), seed 0 did not (its wall_time_s was the step time)
    write_record(s1.out, s1.cfg, status="completed", metrics={"miou": 0.60, "pixel_acc": 0.9}, schema=4,
                 wall_time_s=7.0, step_time_s=1.0)
    write_record(s2.out, s2.cfg, status="failed", error="non-finite loss term 'ss' at iteration 3")
    _, md = write_table(Sweep("table3", "smoke", (0, 1, 2), tmp_path))
    rows = {(r["Network"], r["Method"]): r for r in md_rows(md)}
    eff = rows[("EfficientNet-B0", "Student")]
    assert eff["mIoU"] == "55.00 ± 7.07" and eff["Δ mIoU"] == "-12.56" and eff["seeds"] == "2"
    assert eff["step s/iter"] == "0.150 ± 0.071"  # step time / iterations: 2 / 10 and 1 / 10
    assert eff["wall s"] == "7"  # seed 0's wall time is unknown, so only seed 1's
    assert "2 completed" in eff["status"] and "failed: non-finite loss term" in eff["status"]
    for key, row in rows.items():
        if key[1] != "Student":
            assert row["mIoU"] in STATUS_WORDS, row  # nothing else ran: never a number
    # seeds 2 (failed) and 3 (never run): the cell says so, with no number and no difference
    _, md = write_table(Sweep("table3", "smoke", (2,), tmp_path))
    row = {(r["Network"], r["Method"]): r for r in md_rows(md)}[("EfficientNet-B0", "Student")]
    assert row["mIoU"] == "failed" and row["Δ mIoU"] == "—" and "non-finite loss term" in row["status"]
    _, md = write_table(Sweep("table3", "smoke", (3,), tmp_path))
    row = {(r["Network"], r["Method"]): r for r in md_rows(md)}[("EfficientNet-B0", "Student")]
    assert row["mIoU"] == "missing" and row["seeds"] == "0"
    assert "missing" in (tmp_path / "table3-smoke.csv").read_text()


def test_table1_report_is_wide_like_the_paper(tmp_path):
    _, md = write_table(Sweep("table1", "smoke", (0,), tmp_path))
    header = md_rows(md)[0].keys()
    assert list(header)[2:] == ["Student", "LSR", "Tf-KD", "SAD", "SR-SS", "KL*", "AT*", "CWD*", "Ours"]
    paper_lines = [r for r in md_rows(md) if r[""] == "paper"]
    assert [r["Ours"] for r in paper_lines] == ["72.62", "78.00"]
    measured = [r for r in md_rows(md) if r[""] == "measured"]
    assert all(v in STATUS_WORDS for r in measured for k, v in r.items() if k not in ("Network", ""))


def test_sweep_spec_sets_the_option():
    spec = load_spec("fig3")
    rows = sweep_spec(spec, "N", [2, 4]).groups[0].rows
    assert [r.options for r in rows] == [{"n_experts": 2}, {"n_experts": 4}]


def test_unknown_table_and_preset_are_one_line(tmp_path):
    assert_one_line_error(run_cli("report", "table9", "--results", str(tmp_path)), "unknown table 'table9'")
    with pytest.raises(ConfigError, match="has no preset 'huge'"):
        Sweep("table4", "huge", (0,), tmp_path).plans()


def shrunk_report(tmp_path, monkeypatch, table: str, paper_hw: str, small_hw: str) -> list[dict[str, str]]:
    """The smoke report of `table` with the spec's profiling input size shrunk (fvcore stays fast;
    the wiring is what is checked), as Markdown rows."""
    specs = tmp_path / "specs"
    specs.mkdir()
    text = (ROOT / "sdesbench" / "specs" / f"{table}.yaml").read_text()
    assert f"input_hw: {paper_hw}" in text
    (specs / f"{table}.yaml").write_text(text.replace(f"input_hw: {paper_hw}", f"input_hw: {small_hw}"))
    monkeypatch.setenv("SDESBENCH_EXPERIMENTS", str(specs))
    rep = run_cli("report", table, "--preset", "smoke", "--results", str(tmp_path / "results"))
    assert rep.returncode == 0, rep.stderr
    rows = [dict(r, Method=r["Method"].removesuffix(" †")) for r in md_rows(rep.stdout)]  # Ens-T's oracle mark
    assert len(rows) == sum(len(g.rows) for g in load_spec(table).groups)
    return rows


def paper_sizes_from_yaml(table: str) -> dict[tuple[str, str], tuple[float | None, float | None]]:
    """(group, label) -> the paper's (Params, FLOPs) read from the spec file itself: a row's own
    figures, else its group's, but never the group's (the student's) for an Ens-T row."""
    raw = yaml.safe_load((ROOT / "sdesbench" / "specs" / f"{table}.yaml").read_text())
    out = {}
    for g in raw["groups"]:
        for r in g["rows"]:
            inherited = {} if r.get("metric") == "ens_t" else g
            out[g["name"], r["label"]] = (r.get("params_m", inherited.get("params_m")),
                                          r.get("gflops", inherited.get("gflops")))
    return out


def cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def test_table2_report_has_the_profilers_flops_for_every_network_row(tmp_path, monkeypatch):
    """The report's Params/FLOPs columns are `sdesbench profile`'s numbers beside the paper's; the
    Ens-T row's paper figures are those the paper's text gives for the ResNet-18 ensemble."""
    rows = shrunk_report(tmp_path, monkeypatch, "table2", "[512, 1024]", "[64, 128]")
    prof = run_cli("profile", "--classes", "19", "--input", "64x128", "--json")
    assert prof.returncode == 0, prof.stderr
    expected = {r["model"]: r for r in json.loads(prof.stdout)}
    spec = {g.name: g.model for g in load_spec("table2").groups}
    paper = paper_sizes_from_yaml("table2")
    for row in rows:
        model = "ens_t_resnet18" if row["Method"] == "Ens-T" else spec[row["Network"]]
        assert row["FLOPs (G)"] == f"{expected[model]['gflops']:.2f}", row
        assert row["Params (M)"] == f"{expected[model]['params_m']:.2f}", row
        params, flops = paper[row["Network"], row["Method"]]
        assert (row["paper Params"], row["paper FLOPs"]) == (cell(params), cell(flops)), row
    ens = [r for r in rows if r["Method"] == "Ens-T"]
    assert [(r["paper Params"], r["paper FLOPs"]) for r in ens] == [("15.94", "134.34")]
    student = rows[0]  # the ResNet-18 student beside it keeps its group's figures
    assert (student["Method"], student["paper Params"], student["paper FLOPs"]) == ("Student", "15.90", "134.08")
    if PAPER_TEXT.is_file():
        assert "ensemble teacher for ResNet-18 are 15.94 M and 134.34 G" in PAPER_TEXT.read_text()


def test_table3_ens_t_row_shows_no_paper_params(tmp_path, monkeypatch):
    """The paper gives no size for Table 3's Ens-T: its row shows "—", not the student's 7.31 that
    its group carries, beside the measured ensemble (student plus expert decoders, so larger)."""
    rows = shrunk_report(tmp_path, monkeypatch, "table3", "[512, 512]", "[64, 64]")
    by_label = {(r["Network"], r["Method"]): r for r in rows}
    ens, student = by_label["EfficientNet-B0", "Ens-T"], by_label["EfficientNet-B0", "Student"]
    assert (ens["paper Params"], student["paper Params"]) == ("—", "7.31")
    assert float(ens["Params (M)"]) > float(student["Params (M)"])
    paper = paper_sizes_from_yaml("table3")
    for row in rows:
        assert row["paper Params"] == cell(paper[row["Network"], row["Method"]][0]), row


def test_camvid_paper_presets_evaluate_on_test_and_mini_on_val(tmp_path):
    """CamVid numbers in the literature are test-split numbers (CIRKD's and RDD's eval.py read
    camvid_test_list.txt); `mini` stays on val because the shared copy has no test split."""
    for table in ("table3", "table4", "fig3"):
        spec = load_spec(table)
        for preset, eval_split in (("paper", "test"), ("mini", "val")):
            plans = Sweep(table, preset, (0,), tmp_path).plans(spec)
            assert plans, (table, preset)
            for p in plans:
                assert p.cfg is not None, (table, preset, p.key, p.skipped)
                assert p.cfg.data.name == "camvid", (table, preset, p.key)
                assert (p.cfg.data.train_split, p.cfg.data.eval_split) == ("train", eval_split), (table, preset, p.key)
    # training on train + val is one override away, and still evaluates on test
    plans = Sweep("table3", "paper", (0,), tmp_path, ("data.train_split=trainval",)).plans()
    assert {(p.cfg.data.train_split, p.cfg.data.eval_split) for p in plans} == {("trainval", "test")}
