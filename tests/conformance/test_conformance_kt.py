"""`kt` against the numbers seok-hwa/KT's own training-step code produced on the same seeded inputs, and the
choices its docstring documents (frozen tailoring modules, the phase switch, the triplet axis).

The fixture (kt.json) names the reference's repository, commit and paths, how its loss block was run on a
CPU, the input recipe (`reference_inputs.make_inputs`) and, per case, each term and its gradient with respect
to the student's feature, logits and aux logits. The project's method, given the fixture's tailoring weights
and the logits upsampled (nearest) to the labels' size as the reference upsamples them, must give the same
terms to 1e-5 (relative) and the same gradients to 1e-5 of their absolute sum (a gradient's plain sum is
near 0: every channel-wise KL's gradient sums to 0 over positions).
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sdesbench.config import TrainConfig
from sdesbench.engine import step
from sdesbench.methods import METHODS
from sdesbench.methods.base import StepInfo
from sdesbench.methods.kt import class_masks, logit_tailoring, tailoring_triplet_loss
from test_conformance import close, fixture, inputs, method, project_options

FIXTURE = fixture("kt")
CASES = [pytest.param(c, id=c["name"]) for c in FIXTURE["cases"]]
GRAD_INPUTS = ("student", "student_logits", "student_aux")


def weighted_sums(g: torch.Tensor) -> list[float]:
    """[sum, sum of value x flat index / numel, sum of |value|] in float64: what the fixture records."""
    g = g.double()
    w = torch.arange(g.numel(), dtype=torch.float64).view_as(g) / g.numel()
    return [float(g.sum()), float((g * w).sum()), float(g.abs().sum())]


def kt_for(case: dict, x: dict[str, torch.Tensor], options: dict | None = None):
    s_c, t_c = x["student"].shape[1], x["teacher"].shape[1]
    m = method("kt", {**project_options(case), **(options or {})}, num_classes=x["student_logits"].shape[1],
               decoder_channels=s_c, teacher=SimpleNamespace(decoder_channels=t_c), total_iters=40000)
    with torch.no_grad():
        for module, prefix in ((m.student_tailoring, "st_tail"), (m.teacher_tailoring, "tc_tail")):
            for i in (0, 2, 4):
                module[i].weight.copy_(x[f"{prefix}_{i}_weight"])
                module[i].bias.copy_(x[f"{prefix}_{i}_bias"])
        m.anchor_conv.weight.copy_(x["st_conv"])
    return m


def run(m, case: dict, x: dict[str, torch.Tensor]):
    size = x["labels"].shape[-2:]
    leaves = {n: x[n].clone().requires_grad_(True) for n in GRAD_INPUTS}
    up = lambda z: F.interpolate(z, size=size, mode="nearest")  # noqa: E731 - as train_KT.py upsamples
    student = {"logits": up(leaves["student_logits"]), "aux": up(leaves["student_aux"]),
               "decoder_feature": leaves["student"], "stages": [leaves["student"]]}
    teacher = {"logits": up(x["teacher_logits"]), "aux": up(x["teacher_aux"]), "decoder_feature": x["teacher"]}
    return m.loss_terms(student, x["labels"], StepInfo(case["iteration"] - 1, 40000), teacher), leaves


def test_the_fixture_names_the_reference_and_the_method_points_at_it():
    ref = FIXTURE["reference"]
    assert FIXTURE["method"] == "kt" and ref["repo"] == "seok-hwa/KT" and re.fullmatch(r"[0-9a-f]{40}", ref["commit"])
    assert {"train_KT.py", "losses/KT.py", "models/tailoring.py"} <= {p.strip() for p in ref["path"].split(",")}
    phases = {c["iteration"] >= c["tuning_point"] for c in FIXTURE["cases"]}
    assert phases == {False, True}  # both phases, the last iteration of phase 1 among them
    assert any(c["iteration"] == c["tuning_point"] - 1 for c in FIXTURE["cases"])
    assert METHODS.get("kt").conformance == "kt.json"


@pytest.mark.parametrize("case", CASES)
def test_kt_terms_and_gradients_equal_the_reference_code(case):
    x = inputs(case)
    terms, leaves = run(kt_for(case, x), case, x)
    assert set(terms) == {"ss", "aux", "kd", "kd_aux", "lt", "ft", "triplet"}
    got = {"kd": terms["kd"] + terms["kd_aux"], "lt": terms["lt"], "ft": terms["ft"], "triplet": terms["triplet"]}
    for name, value in got.items():
        close(value, case["expected"][name])
        grads = torch.autograd.grad(value, [leaves[n] for n in GRAD_INPUTS], retain_graph=True, allow_unused=True)
        for leaf, g in zip(GRAD_INPUTS, grads):
            expected = case["expected_gradients"].get(f"{name}/{leaf}")
            if expected is None:  # the reference's gradient there is zero: so is ours
                assert g is None or float(g.abs().sum()) == 0.0, f"{name}/{leaf}"
                continue
            assert weighted_sums(g) == pytest.approx(expected, abs=1e-5 * expected[2]), f"{name}/{leaf}"


# ----------------------------------------------------------------------------- the documented choices


def test_tailoring_modules_are_frozen_by_default_and_trained_in_their_own_group_when_asked():
    case = FIXTURE["cases"][0]
    x = inputs(case)
    frozen = kt_for(case, x)
    assert not any(p.requires_grad for p in frozen.tailoring_parameters()) and frozen.param_groups(0.01) == []
    trained = kt_for(case, x, {"kt_train_tailoring": True, "kt_tailoring_lr_mult": 10.0})
    (group,) = trained.param_groups(0.01)
    assert group["lr"] == pytest.approx(0.1)
    assert {id(p) for p in group["params"]} == {id(p) for p in trained.tailoring_parameters()}
    assert all(p.requires_grad for p in group["params"])
    terms, _ = run(trained, case, x)  # phase 1: phi_S and the anchor conv receive gradients
    (terms["ft"] + terms["triplet"]).backward()
    assert trained.student_tailoring[0].weight.grad.abs().sum() > 0 and trained.anchor_conv.weight.grad is not None
    assert trained.teacher_tailoring[0].weight.grad is None


def test_the_trainers_optimizer_leaves_the_tailoring_out_by_default_and_gives_it_its_own_group_when_trained():
    def groups(options):
        learner = step.random_learner("enet", "kt", 3, options, train=TrainConfig(iters=4, lr=0.01))
        tailoring = {id(p) for p in learner.method.tailoring_parameters()}
        return [({id(p) for p in g["params"]} & tailoring, g["lr"]) for g in learner.optimizer.param_groups], tailoring

    (main,), _ = groups({})
    assert main == (set(), pytest.approx(0.01))  # the reference's optimiser: the student (and nothing of KT's)
    (main, own), tailoring = groups({"kt_train_tailoring": True, "kt_tailoring_lr_mult": 10.0})
    assert main == (set(), pytest.approx(0.01)) and own == (tailoring, pytest.approx(0.1))


def test_the_phase_switch_is_absolute_by_default_and_a_quarter_of_the_run_when_relative():
    case = FIXTURE["cases"][0]
    x = inputs(case)
    assert kt_for(case, x).tuning_point == 10000
    m = method("kt", {"kt_tuning_scale": "relative"}, num_classes=3, decoder_channels=4,
               teacher=SimpleNamespace(decoder_channels=6), total_iters=400)
    assert m.tuning_point == 100  # 10,000 / 40,000 of 400 iterations


def test_channel_triplet_axis_measures_per_pixel_distances_across_channels():
    gen = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(2, 3, 4, 5, generator=gen) for _ in range(3))
    d = lambda u, v: (u - v + 1e-7).pow(2).sum(1).sqrt()  # noqa: E731 - across channels, torch's eps inside
    assert float(tailoring_triplet_loss(a, p, n, 1.0, "channel")) == pytest.approx(
        float((1.0 + d(a, p) - d(a, n)).clamp(min=0).mean()), rel=1e-6)
    dw = lambda u, v: (u - v + 1e-7).pow(2).sum(3).sqrt()  # noqa: E731 - along the width (the reference)
    assert float(tailoring_triplet_loss(a, p, n, 1.0, "width")) == pytest.approx(
        float((1.0 + dw(a, p) - dw(a, n)).clamp(min=0).mean()), rel=1e-6)


def test_logit_tailoring_by_hand_on_one_row():
    # one image, 2 classes, 4 pixels labelled [0, 0, 1, ignored]
    z = torch.tensor([[[[2.0, -1.0, 4.0, 3.0]], [[-2.0, -3.0, -1.0, 5.0]]]])
    masks = class_masks(torch.tensor([[[0, 0, 1, 255]]]), 2)
    inside, outside = logit_tailoring(z, masks)
    # class 0: m+ = mean of the positive logits in its region {2} = 2 -> max(z, 2) on pixels 0, 1
    # class 1: no positive logit in its region {-1}: unchanged
    assert inside.tolist() == [[[[2.0, 2.0, 0.0, 0.0]], [[0.0, 0.0, -1.0, 0.0]]]]
    # class 0 outside its region (pixels 2, 3): m- = (4 + 3) / 4 = 1.75 -> min(z, 1.75)
    # class 1 outside (pixels 0, 1, 3 incl. the ignored one): m- = (-2 - 3 + 5) / 4 = 0 -> min(z, 0)
    assert outside.tolist() == [[[[0.0, 0.0, 1.75, 1.75]], [[-2.0, -3.0, 0.0, 0.0]]]]
