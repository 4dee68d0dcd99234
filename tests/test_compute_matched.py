"""`run --compute-matched`: a Student trained for as long as its group's KD rows cost (issue 28, section 2), and
each run's recorded total cost (record schema 7)."""
import json

import pytest

from conftest import run_cli
from sdesbench.engine.configure import build_config
from sdesbench.engine.cost import train_step_flops
from sdesbench.engine.record import RunCost, RunRecord, cost_of, read_record
from sdesbench.experiments.plan import Sweep

ITERS = 6  # x 1.10 -> 7 iterations: another run than the Student
SPEC = f"""title: equal compute on Table 4's network
presets:
  smoke:
    data: {{name: tiny, crop: [32, 32], batch_size: 2}}
    train: {{iters: {ITERS}, checkpoint_every: 1000}}
    eval: {{max_images: 2}}
options:
  sdes: {{tau: 5, n_experts: 2, expert: student}}
  sdes-no-dfed: {{tau: 5, n_experts: 2, expert: student}}
groups:
  - name: EfficientNet-B0
    model: deeplabv3_efficientnet_b0
    rows: [{{label: L_SS, method: student}}, {{label: Ours, method: sdes}}, {{label: DPED, method: sdes-no-dfed}}]
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cm")
    spec = tmp / "eq.yaml"
    spec.write_text(SPEC)
    # `--compute-matched` alone means flops (sdesbench/cli.py, OPTIONAL_VALUES)
    proc = run_cli("run", str(spec), "--results", str(tmp / "results"), "--no-progress", "--compute-matched")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Sweep(str(spec), "smoke", (0,), tmp / "results", compute_matched="flops"), proc


def test_compute_matched_student_trains_for_the_flops_ratio(swept):
    sweep, proc = swept
    plans = sweep.plans()
    # independently: one step's FLOPs of each KD method over the plain student's, rounded to 5%
    student = train_step_flops(build_config({"model": {"name": "deeplabv3_efficientnet_b0"}}))
    classes = set()
    for method in ("sdes", "sdes-no-dfed"):
        kd = build_config({"model": {"name": "deeplabv3_efficientnet_b0"},
                           "method": {"name": method, "tau": 5, "n_experts": 2, "expert": "student"}})
        classes.add(round(train_step_flops(kd) / student * 20) / 20)
    assert len(classes) == 1  # both rows cost the same within 5%: one run, not one per row
    (cls,) = classes
    assert cls > 1.0
    matched = [p for p in plans if p.matches is not None]
    assert [p.matches for p in matched] == [pytest.approx(cls)]
    assert [p.cost_class for p in plans if p.method != "student"] == pytest.approx([cls, cls])
    rec = read_record(matched[0].out)
    assert rec.completed and rec.iterations == round(ITERS * cls) != ITERS
    assert rec.config["train"]["iters"] == round(ITERS * cls)  # the poly schedule decays over the new total
    assert rec.method == "student" and rec.config["model"]["name"] == "deeplabv3_efficientnet_b0"


def test_each_run_records_its_total_cost(swept):
    sweep, _ = swept
    for p in sweep.plans():
        rec = read_record(p.out)
        assert rec.schema == 7 and rec.cost is not None
        assert rec.cost.images == rec.iterations * 2 * rec.world_size
        assert rec.cost.device_kind == "CPU" and rec.cost.devices == 1
        assert rec.cost.device_hours == pytest.approx(rec.wall_time_s / 3600, abs=1e-6)


def test_an_older_record_reads_and_its_cost_is_derived(tmp_path):
    old = {"schema": 6, "status": "completed", "config": {"data": {"batch_size": 4}}, "iterations": 30,
           "wall_time_s": 720.0, "world_size": 2, "device": "NVIDIA H100"}
    rec = RunRecord.from_dict(json.loads(json.dumps(old)))
    assert rec.cost is None and rec.schema == 7
    assert cost_of(rec) == RunCost("GPU", 2, 0.4, 240)  # 720 s x 2 GPUs = 0.4 GPU-hours; 30 x 4 x 2 images
    assert cost_of(RunRecord.from_dict({"schema": 3, "status": "completed", "wall_time_s": 5.0})) is None


def test_report_shows_the_gain_against_both_students_and_the_total_cost(swept):
    sweep, _ = swept
    import pandas as pd

    plans = {p.row: p for p in sweep.plans()}
    matched = next(p for p in plans.values() if p.matches is not None)
    miou = {row: 100 * read_record(plans[row].out).metrics.miou for row in ("L_SS", "Ours", "DPED")}
    miou["matched"] = 100 * read_record(matched.out).metrics.miou
    csv = pd.read_csv(sweep.results / "eq-smoke.csv", dtype=str).set_index("Method")
    for row in ("Ours", "DPED"):
        assert float(csv.loc[row, "Δ Student mIoU"]) == pytest.approx(miou[row] - miou["L_SS"], abs=0.006)
        assert float(csv.loc[row, "Δ Student (equal compute) mIoU"]) == pytest.approx(miou[row] - miou["matched"],
                                                                                      abs=0.006)
    md = (sweep.results / "eq-smoke.md").read_text()
    hours = sum(read_record(p.out).cost.device_hours for p in {str(p.out): p for p in plans.values()}.values())
    assert f"Total cost of the table's 4 completed run(s) (teachers and stage runs included): {hours:.4g} CPU-hours" in md
    assert "training FLOPs (FLOPs per image x images trained on)" in md


def test_by_time_the_student_depends_on_the_rows_and_matches_their_step_times(swept, tmp_path):
    sweep, _ = swept
    spec = sweep.table
    # before any record: planned as waiting, with a compute-matched dependency on each row it is measured from
    fresh = [p for p in Sweep(spec, "smoke", (0,), tmp_path, compute_matched="time").plans() if p.row.startswith("Student")]
    assert len(fresh) == 1 and fresh[0].cfg is None and "waiting for the step times" in fresh[0].skipped
    assert {d.kind for d in fresh[0].dependencies} == {"compute-matched"} and len(fresh[0].dependencies) == 3
    # with the records: the class from their step times per image (one seed: its mean), computed here from them
    plans = Sweep(spec, "smoke", (0,), sweep.results, compute_matched="time").plans()
    rows = {p.row: p for p in plans}

    def per_image(row):
        rec = read_record(rows[row].out)
        return rec.step_time_s / (rec.iterations * 2)

    classes = {round(per_image(r) / per_image("L_SS") * 20) / 20 for r in ("Ours", "DPED")}
    matched = [p for p in plans if p.matches is not None]
    assert sorted(p.matches for p in matched) == sorted(c for c in classes if c != 1.0)
    for p in matched:
        assert p.cfg.train.iters == round(ITERS * p.matches)
        assert {d.kind for d in p.dependencies} == {"compute-matched"}
        assert str(rows["L_SS"].out) in p.depends_on


def test_dry_run_shows_the_added_student_and_a_bad_choice_is_one_line(swept, capsys):
    from sdesbench.commands._shared import print_plan
    from sdesbench.errors import ConfigError

    sweep, _ = swept
    plans = sweep.plans()
    (cost,) = [p.matches for p in plans if p.matches is not None]
    print_plan(plans)  # what `run --dry-run` prints
    shown = capsys.readouterr().out
    assert f"Student (compute ×{cost:.2f})" in shown and f"compute-matched: flops ×{cost:.2f}" in shown
    with pytest.raises(ConfigError, match=r"^--compute-matched 'watts': choose flops or time$"):
        Sweep(sweep.table, compute_matched="watts")


def test_an_option_given_without_its_optional_value_gets_its_default():
    from sdesbench.cli import with_optional_values

    assert with_optional_values(["run", "t", "--compute-matched"]) == ["run", "t", "--compute-matched", "flops"]
    assert with_optional_values(["run", "t", "--compute-matched", "--dry-run"]) == \
        ["run", "t", "--compute-matched", "flops", "--dry-run"]
    assert with_optional_values(["run", "t", "--compute-matched", "time"]) == ["run", "t", "--compute-matched", "time"]
    assert with_optional_values(["run", "t", "--compute-matched=time"]) == ["run", "t", "--compute-matched=time"]
