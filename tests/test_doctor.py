"""`sdesbench doctor`: the CPU checks CI runs, a NaN named in one line, and the precision tolerance, which
catches a real half-precision bug (a temperature KL computed in bf16) and passes the suite's methods."""
import json
import math
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_cli
from sdesbench.measure.doctor.precision import Precision, check_training, make_probe, network_shape, tolerance
from sdesbench.methods import METHODS
from sdesbench.methods.base import Method
from sdesbench.methods.losses import full_precision, pixel_ce
from sdesbench.models import MODELS


def test_cpu_quick_json_lists_every_method_and_model_all_passing():
    proc = run_cli("doctor", "--device", "cpu", "--quick", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["passed"] and r["failures"] == [] and r["precisions"] == ["fp32", "bf16"]
    on_r18 = {(c["method"], c["label"]) for c in r["checks"] if c["model"] == "deeplabv3_resnet18"}
    assert on_r18 == {(m, p) for m in METHODS.names() for p in ("fp32", "bf16")}  # CPU autocast: real bf16
    assert {c["model"] for c in r["checks"] if c["method"] == "student"} == set(MODELS.names())
    assert all(c["passed"] and c["steps"] == 2 for c in r["checks"])
    assert all(c["worst"] == 0.0 for c in r["checks"] if c["label"] == "fp32")  # fp32 is the reference
    bf16 = {(c["method"], c["model"]): c["worst"] for c in r["checks"] if c["label"] == "bf16"}
    assert all(w < 1.0 for w in bf16.values())  # within the derived tolerance of fp32
    assert bf16["student", "deeplabv3_resnet18"] > 0.0  # and really rounded to bf16 (CPU autocast)
    assert all(math.isfinite(v) for c in r["checks"] for v in c["terms"].values())
    assert r["compile"] == {"skipped": "--quick"} and r["ddp"] == {"skipped": "--quick"}
    (speed,) = r["speed"]
    assert speed["images_per_s"] == pytest.approx(speed["batch"] / (speed["step_ms"] / 1e3), rel=0.01)
    assert {t["table"] for t in r["tables"]} >= {"table1", "table2", "table3", "table4"}
    assert {w["backbone"] for w in r["weights"]} >= {"resnet18", "efficientnet_b0"}
    assert all(w["found"] or "model.weights" in w["hint"] for w in r["weights"])
    assert r["environment"]["torch"] == torch.__version__ and r["environment"]["free_disk_gb"] > 0


class _NaNMethod(Method):
    """Test-only: a finite CE and a loss term that is NaN."""

    @dataclass
    class Options:
        pass

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        ce = pixel_ce(student_out["logits"], labels)
        return {"ss": ce, "broken": ce * float("nan")}


def test_a_nan_term_fails_doctor_in_one_line(monkeypatch, capsys):
    from sdesbench import cli

    METHODS.register("_test_nan")(_NaNMethod)
    try:
        monkeypatch.setattr(sys, "argv", ["sdesbench", "doctor", "--device", "cpu", "--quick", "--json", "--no-speed",
                                          "--methods", "_test_nan", "--models", "deeplabv3_resnet18"])
        with pytest.raises(SystemExit) as e:
            cli.main()
    finally:
        METHODS._entries.pop("_test_nan")
    assert e.value.code == 1
    captured = capsys.readouterr()
    (line,) = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    # the first failure is named; its bf16 check fails too, and says so in the count
    assert line == ("error: method _test_nan on deeplabv3_resnet18, precision fp32: term 'broken' is nan at step 1 "
                    "(and 1 more check(s) failed)")
    r = json.loads(captured.out)
    assert not r["passed"]
    assert {(c["method"], c["label"]): c["passed"] for c in r["checks"]} == {
        ("_test_nan", "fp32"): False, ("_test_nan", "bf16"): False, ("student", "fp32"): True,
        ("student", "bf16"): True}  # the student still passes


class _KLInAutocastDtype(Method):
    """Test-only: CE + a temperature-softened KL to the teacher computed in the autocast dtype, i.e.
    without the fp32 helpers (`losses.full_precision` + `fp32`) that docs/performance.md asks for."""

    needs_teacher = True

    @dataclass
    class Options:
        pass

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        with full_precision():
            s, t = student_out["logits"].to(dtype), teacher_out["logits"].to(dtype)
            kl = F.kl_div(F.log_softmax(s / 4, 1), F.log_softmax(t / 4, 1), log_target=True, reduction="none")
        return {"ss": pixel_ce(student_out["logits"], labels), "kd": 16 * kl.sum(1).mean()}


def test_bf16_tolerance_passes_the_suite_kd_and_catches_a_kl_in_bf16():
    """CPU autocast computes in real bf16, so the comparison runs here: `kl` (softmax and KL in fp32 on
    bf16 logits) is within tolerance, the same KL computed in bf16 is not."""
    torch.set_num_threads(1)
    probe = make_probe(2, 32)
    cpu = torch.device("cpu")
    (good,) = check_training("kl", "deeplabv3_resnet18", cpu, probe, 1, [Precision("bf16")])
    assert good.passed and 0 < good.worst < 0.5, good
    METHODS.register("_test_kl_bf16")(_KLInAutocastDtype)
    try:
        fp32, bf16 = check_training("_test_kl_bf16", "deeplabv3_resnet18", cpu, probe, 1,
                                    [Precision("bf16"), Precision("fp32")])
    finally:
        METHODS._entries.pop("_test_kl_bf16")
    assert fp32.precision == "fp32" and fp32.passed and fp32.worst == 0.0  # fp32 runs first: it is the reference
    assert not bf16.passed and "term 'kd'" in bf16.failure and "precision bf16" in bf16.failure
    assert abs(bf16.terms["kd"] - fp32.terms["kd"]) > bf16.tolerance * abs(fp32.terms["kd"])


def test_tolerance_and_network_shape_by_hand():
    # D layers, three roundings each at u plus fp32 accumulation over K products: 4 (u sqrt(3D) + u32 sqrt(DK))
    assert tolerance("bf16", 28, 4608) == pytest.approx(4 * (2 ** -8 * math.sqrt(84) + 2 ** -24 * math.sqrt(28 * 4608)))
    assert tolerance("fp16", 12, 27) == pytest.approx(4 * (2 ** -11 * 6 + 2 ** -24 * 18))
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 5, groups=4), nn.Flatten(), nn.Linear(40, 2))
    assert network_shape([net]) == (3, 50)  # fan-ins 3*3*3 = 27, (8/4)*5*5 = 50, 40
