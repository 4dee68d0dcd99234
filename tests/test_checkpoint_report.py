"""Which checkpoint a report shows (`report --checkpoint last|best`): from hand-made records whose best
periodic evaluation is not their last, the two tables differ by exactly the hand-picked numbers, the header
says which checkpoint and, for best, that it was selected on the split it is scored on; mixing in numbers of
the last checkpoint is refused in one line. No training."""
import json

import pytest

from conftest import rows_of
from sdesbench.errors import ConfigError
from sdesbench.experiments.plan import Sweep
from sdesbench.report import ReportOptions, build_report
from sdesbench.report.columns import ExtraEvaluation

STUDENT, OURS = "L_SS", "L_SS + L_DPED + L_DFED"
# (iteration, mIoU) of each row's periodic evaluations; the last is the final metric. The Student's best is
# its last; Ours peaks at iteration 20 (0.62) and ends lower (0.58); its tie at 30 goes to the earlier one.
HISTORY = {STUDENT: [(20, 0.50), (30, 0.51), (40, 0.55)], OURS: [(20, 0.62), (30, 0.62), (40, 0.58)]}


def fake_run(plan, history: list[tuple[int, float]]) -> None:
    plan.out.mkdir(parents=True, exist_ok=True)
    evals = [{"iteration": i, "images": 2, "miou": m, "pixel_acc": 0.8 + i / 1000} for i, m in history]
    rec = {"status": "completed", "config_hash": plan.cfg.identity_hash(), "iterations": 40, "num_classes": 1,
           "metrics": {"miou": history[-1][1], "pixel_acc": 0.84}, "history": evals}
    (plan.out / "results.json").write_text(json.dumps(rec))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    res = tmp_path_factory.mktemp("results")
    for p in Sweep("table4", "smoke", (0,), res).plans():
        if p.row in HISTORY:
            fake_run(p, HISTORY[p.row])
    return res


def test_best_and_last_tables_differ_and_say_which(results):
    sweep = Sweep("table4", "smoke", (0,), results)
    last = build_report(sweep, ReportOptions(columns=("miou", "pa")))
    best = build_report(sweep, ReportOptions(columns=("miou", "pa"), checkpoint="best"))
    assert last.files[0].name == "table4-smoke.md" and best.files[0].name == "table4-smoke-best.md"
    lrows, brows = rows_of(last.md), rows_of(best.md)
    assert lrows[OURS]["mIoU"] == "58.00" and brows[OURS]["mIoU"] == "62.00"  # best at iteration 20, not 30
    assert brows[OURS]["PA"] == "82.00"  # the pixel accuracy of that same evaluation (0.8 + 20/1000)
    assert lrows[STUDENT]["mIoU"] == brows[STUDENT]["mIoU"] == "55.00"  # best is last
    assert "Checkpoint: **last**" in last.md and "Checkpoint: **best**" not in last.md
    assert "Checkpoint: **best**" in best.md and "selected on the `val` split it is scored on" in best.md
    assert "on 2 image(s)" in best.md
    # the last table on disk is untouched by the best one
    assert rows_of((results / "table4-smoke.md").read_text())[OURS]["mIoU"] == "58.00"


def test_best_without_history_and_mixing_are_refused(results, tmp_path):
    p = next(p for p in Sweep("table4", "smoke", (0,), tmp_path).plans() if p.row == STUDENT)
    fake_run(p, [(40, 0.55)])
    rec = json.loads((p.out / "results.json").read_text())
    (p.out / "results.json").write_text(json.dumps(rec | {"history": []}))
    md = build_report(Sweep("table4", "smoke", (0,), tmp_path), ReportOptions(checkpoint="best")).md
    assert "missing: no periodic evaluation (eval.every)" in md
    with pytest.raises(ConfigError, match="--stats score"):
        build_report(Sweep("table4", "smoke", (0,), tmp_path), ReportOptions(checkpoint="best", stats=True))
    with pytest.raises(ConfigError, match="--format latex, --plot score.*a table mixing the best and the last"):
        build_report(Sweep("table4", "smoke", (0,), tmp_path), ReportOptions(checkpoint="best", latex=True, plot=True))
    # an --eval-set column of a best table reads the best checkpoint's evaluation records, never the last's
    md = build_report(Sweep("table4", "smoke", (0,), tmp_path),
                      ReportOptions(checkpoint="best", extra=ExtraEvaluation.parse(["eval.flip=true"]))).md
    assert "evaluation of the best checkpoint" in md and "checkpoints/best.pt --record" in md
