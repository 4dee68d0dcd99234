"""Loss balance (sdesbench.measure.loss_balance, `sdesbench balance`) against hand-computed gradients."""
import json
import math

import pytest
import torch
from torch import nn

from conftest import FAST, assert_one_line_error, run_cli
from sdesbench.config import RunConfig
from sdesbench.engine.configure import build_config
from sdesbench.engine.step import random_learner
from sdesbench.errors import ConfigError
from sdesbench.measure.loss_balance import encoder_parameters, loss_balance
from sdesbench.methods.base import Method, MethodContext
from sdesbench.models.base import SegmentationModel


class ToyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.d = nn.Parameter(torch.tensor(1.7))

    def forward(self, stages):
        return {"decoder_feature": stages[-1], "logits": self.d * stages[-1]}


class ToyModel(SegmentationModel):
    """stages = [e0 x, e1 x], logits = d e1 x: encoder parameters (e0, e1), decoder parameter d."""

    def __init__(self):
        super().__init__()
        self.e = nn.Parameter(torch.tensor([0.7, -1.3]))
        self.decoder = ToyDecoder()

    def encode(self, x):
        return [self.e[0] * x, self.e[1] * x]


class ToyMethod(Method):
    name = "toy"

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        return {"ss": student_out["logits"].mean(),  # d e1 m
                "feat": 3 * student_out["stages"][0].pow(2).mean(),  # 3 e0^2 q
                "expert": student_out["stages"][1].detach().pow(2).mean()}  # e1^2 q, no gradient


def test_toy_model_gradients_match_closed_form():
    torch.manual_seed(0)
    model = ToyModel()
    method = ToyMethod(None, MethodContext(model=model, num_classes=1, total_iters=1, class_pixel_counts=lambda: None))
    x = torch.rand(2, 1, 4, 5) + 0.5
    rows = loss_balance(model, method, x, torch.zeros(2, 4, 5, dtype=torch.long))
    e0, e1, d = 0.7, -1.3, 1.7
    m, q = float(x.mean()), float(x.pow(2).mean())
    # d/de of: ss = d e1 m -> (0, d m); feat = 3 e0^2 q -> (6 e0 q, 0); expert -> 0 (detached)
    expected = {"ss": (d * e1 * m, abs(d * m)), "feat": (3 * e0 ** 2 * q, abs(6 * e0 * q)),
                "expert": (e1 ** 2 * q, 0.0),
                "total": (d * e1 * m + 3 * e0 ** 2 * q + e1 ** 2 * q, math.hypot(6 * e0 * q, d * m))}
    assert set(rows) == set(expected)
    for name, (value, grad) in expected.items():
        assert rows[name]["value"] == pytest.approx(value, rel=1e-6), name
        assert rows[name]["grad_norm"] == pytest.approx(grad, rel=1e-6, abs=1e-12), name
        assert rows[name]["value_ratio"] == pytest.approx(value / (d * e1 * m), rel=1e-6), name
        assert rows[name]["grad_ratio"] == pytest.approx(grad / abs(d * m), rel=1e-6, abs=1e-12), name
    # the decoder's d is not an encoder parameter (with it, ss's norm would be hypot(d m, e1 m))
    assert [p is model.e for p in encoder_parameters(model)] == [True]
    assert model.e.grad is None and model.decoder.d.grad is None  # nothing accumulated


def _sdes_balance(options):
    """SDES on DeepLabV3-ResNet-18, one 64x64 image, eval mode (no dropout, BN running stats)."""
    unit = random_learner("deeplabv3_resnet18", "sdes", 11, {"n_experts": 2, **options}).plain_unit
    unit.eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, 64, 64, generator=g)
    labels = torch.randint(0, 11, (1, 64, 64), generator=g)
    return loss_balance(unit.model, unit.method, images, labels)


def test_sdes_forms_relate_as_their_formulas_say():
    l2 = _sdes_balance({"dfed_distance": "l2", "tau_squared": False, "beta": 100.0})
    sq = _sdes_balance({"dfed_distance": "squared_mean", "tau_squared": True, "beta": 100.0, "tau": 5.0})
    plain = _sdes_balance({"dfed_distance": "l2", "tau_squared": False, "beta": 100.0, "tau": 5.0})
    positions = 8 * 8  # stride-8 last stage of a 64x64 input
    dist = l2["dfed"]["value"] / 100.0  # ||A_L - A^T||_2 of the one image
    # beta mean((A_L - A^T)^2) = beta dist^2 / HW; its gradient is (2 dist / HW) times the L2 form's
    assert sq["dfed"]["value"] == pytest.approx(100.0 * dist ** 2 / positions, rel=1e-5)
    assert sq["dfed"]["grad_norm"] == pytest.approx(2 * dist / positions * l2["dfed"]["grad_norm"], rel=1e-4)
    # tau^2 multiplies L_DPED and its gradient by 25; L_SS is untouched
    assert sq["dped"]["value"] == pytest.approx(25 * plain["dped"]["value"], rel=1e-5)
    assert sq["dped"]["grad_norm"] == pytest.approx(25 * plain["dped"]["grad_norm"], rel=1e-4)
    assert sq["ss"] == plain["ss"]
    # the experts read detached stages: their loss never reaches the encoder (paper, below Eq. 3)
    assert sq["ss_experts"]["value"] > 0 and sq["ss_experts"]["grad_norm"] == 0.0


def test_keep_checkpoints_every_is_checked_and_outside_the_hash():
    with pytest.raises(ConfigError, match="keep_checkpoints_every=30 must be a multiple of train.checkpoint_every=20"):
        build_config({}, ["train.checkpoint_every=20", "train.keep_checkpoints_every=30"])
    kept = build_config({}, ["train.checkpoint_every=20", "train.keep_checkpoints_every=40"])
    assert kept.identity_hash() == build_config({}).identity_hash()


def test_balance_command_on_kept_checkpoints(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--method", "sdes", "--iters", "2", "--out", str(out), "--set", "method.n_experts=2",
                   "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints_every=1", *FAST)
    assert proc.returncode == 0, proc.stderr
    ckpts = [str(out / "checkpoints" / f"iter_{k}.pt") for k in (1, 2)]
    records = {}
    for form in ("l2", "squared_mean"):
        proc = run_cli("balance", *ckpts, "--batches", "2", "--json", "--set", f"method.dfed_distance={form}")
        assert proc.returncode == 0, proc.stderr
        records[form] = json.loads(proc.stdout)
        assert [r["iteration"] for r in records[form]] == [1, 2]
        assert set(records[form][0]["terms"]) == {"ss", "ss_experts", "dped", "dfed", "total"}
        assert records[form][0]["method_options"]["dfed_distance"] == form
    for a, b in zip(records["l2"], records["squared_mean"]):  # same weights, batches and dropout
        assert a["terms"]["ss"] == b["terms"]["ss"]
        assert b["terms"]["dfed"]["value"] < a["terms"]["dfed"]["value"]
    assert records["l2"][0]["terms"]["ss"] != records["l2"][1]["terms"]["ss"]  # two different checkpoints
    table = run_cli("balance", ckpts[1], "--batches", "1")
    assert table.returncode == 0 and "grad / ss" in table.stdout and "dfed" in table.stdout, table.stderr
    assert_one_line_error(run_cli("balance", str(tmp_path / "none.pt")), "checkpoint not found")
    assert_one_line_error(run_cli("balance", ckpts[1], "--set", "method.n_experts=3"), "do not fit the options")
