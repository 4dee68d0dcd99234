"""Each baseline against the numbers its public reference code produced on the same seeded inputs.

The fixtures (`<method>.json` beside this file) hold, per case, the reference's repository, commit
and path, how it was called, the input recipe (`reference_inputs.make_inputs`) and the outputs it
returned. The reference code itself is not in this repository: it was run once, outside it, on
the inputs the recipe makes. Here the project's loss -- with the options the fixture names --
must give the same numbers to 1e-5 (relative), and for Tf-FD's intra-layer term the same
gradients, since the difference that matters there is where the gradient goes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reference_inputs import check_inputs, make_inputs
from sdesbench.methods.base import MethodContext, StepInfo
from sdesbench.methods.cwd import cwd_loss
from sdesbench.methods.kl import KL, kd_term
from sdesbench.methods.losses import pixel_ce
from sdesbench.methods.sad import sad_loss
from sdesbench.methods.srss import (SelfRegulation, class_presence, presence_loss, sr_feature_loss,
                                    sr_presence_loss)
from sdesbench.methods.tffd import intra_layer_loss
from sdesbench.methods import METHODS

HERE = Path(__file__).resolve().parent
REL = 1e-5
# every baseline with public reference code, and the cases each fixture must hold
REQUIRED = {"kl": {"T1", "T4"}, "cwd": {"logits", "adapter"}, "at": {"authors_beta_1e3"},
            "lsr": {"others", "all"}, "tfkd": {"reg_resnet18", "self_multiplier_50"}, "sad": {"three_pairs"},
            "srss": {"mea_sr"}, "tffd": {"intra", "tfd_three_stages"},
            "rdd": {"tfe_stage", "tse_thresh_bound", "tse_min_kept_bound"}}


def fixture(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


def cases(name: str) -> list:
    return [pytest.param(c, id=c["name"]) for c in fixture(name)["cases"]]


def inputs(case: dict) -> dict[str, torch.Tensor]:
    x = make_inputs(case["seed"], case["inputs"])
    check_inputs(case, x)
    return x


def close(actual: torch.Tensor | float, expected: float) -> None:
    actual = actual.detach() if torch.is_tensor(actual) else actual
    assert float(actual) == pytest.approx(expected, rel=REL, abs=1e-9)


def method(name: str, options: dict, num_classes: int = 5, stage_channels=(4, 8), decoder_channels: int = 4,
           teacher=None, total_iters: int = 10):
    model = SimpleNamespace(stage_channels=list(stage_channels), decoder_channels=decoder_channels)
    ctx = MethodContext(model=model, num_classes=num_classes, total_iters=total_iters,
                        class_pixel_counts=lambda: None, teacher=teacher)
    cls = METHODS.get(name)
    return cls(cls.parse_options(options, num_classes), ctx)


def project_options(case: dict) -> dict:
    return dict(case["project"]["options"])


# ----------------------------------------------------------------------------- the fixtures themselves


def test_every_baseline_with_public_code_has_its_cases():
    for name, needed in REQUIRED.items():
        assert needed <= {c["name"] for c in fixture(name)["cases"]}, name


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_fixtures_name_repository_commit_and_path(name):
    fx = fixture(name)
    for case in fx["cases"]:
        ref = case.get("reference", fx["reference"])
        assert isinstance(ref, dict), f"{name}/{case['name']}: no reference"
        assert ref["repo"] and ref["path"] and ref["function"]
        if ref["repo"] == "pytorch/pytorch":  # the installed torch itself: its version, not a commit
            assert ref["version"]
        else:
            assert re.fullmatch(r"[0-9a-f]{40}", ref["commit"]), ref
        assert case["reference_call"] and case["expected"] and case["checksums"]


# ----------------------------------------------------------------------------- kl


@pytest.mark.parametrize("case", cases("kl"))
def test_kl_equals_cirkd_criterion_kd(case):
    x = inputs(case)
    opts = KL.parse_options(project_options(case))
    close(kd_term(opts, x["student"], x["teacher"], x["labels"]), case["expected"]["kd"])


# ----------------------------------------------------------------------------- cwd


def test_cwd_on_logits_equals_cirkd():
    case = next(c for c in fixture("cwd")["cases"] if c["name"] == "logits")
    x = inputs(case)
    close(cwd_loss(x["student"], x["teacher"], 4.0), case["expected"]["cwd"])


def test_cwd_with_adapter_equals_cirkd_with_student_channel_norm_and_default_is_cs_over_ct_of_it():
    case = next(c for c in fixture("cwd")["cases"] if c["name"] == "adapter")
    x = inputs(case)
    c_s, c_t = x["student"].shape[1], x["teacher"].shape[1]
    teacher = SimpleNamespace(decoder_channels=c_t, stage_channels=[4, 8])
    values = {}
    for norm in ("student", "teacher"):
        m = method("cwd", {**project_options(case), "cwd_channel_norm": norm}, decoder_channels=c_s, teacher=teacher)
        with torch.no_grad():
            m.cwd.adapter.weight.copy_(x["adapter_weight"])
        values[norm] = m.cwd({"decoder_feature": x["student"]}, {"decoder_feature": x["teacher"]})
    close(values["student"], case["expected"]["cwd"])
    close(values["teacher"], case["expected"]["cwd"] * c_s / c_t)  # the documented default: divided by C_T
    assert METHODS.get("cwd").Options().cwd_channel_norm == "teacher"


# ----------------------------------------------------------------------------- at


@pytest.mark.parametrize("case", cases("at"))
def test_at_equals_the_authors_code_and_cirkd(case):
    x = inputs(case)
    m = method("at", project_options(case), num_classes=3)
    student = {"logits": torch.zeros(2, 3, 8, 8), "aux": None, "stages": [x[f"student_{j}"] for j in (1, 2, 3)]}
    teacher = {"stages": [x[f"teacher_{j}"] for j in (1, 2, 3)]}
    terms = m.loss_terms(student, torch.zeros(2, 8, 8, dtype=torch.long), StepInfo(0, 1), teacher)
    close(terms["at"], case["expected"]["at"])


# ----------------------------------------------------------------------------- lsr


@pytest.mark.parametrize("case", cases("lsr"))
def test_lsr_equals_public_label_smoothing(case):
    x = inputs(case)
    m = method("lsr", project_options(case), num_classes=x["logits"].shape[1])
    terms = m.loss_terms({"logits": x["logits"], "aux": None}, x["labels"], StepInfo(0, 1))
    close(terms["ss"], case["expected"]["ss"])


# ----------------------------------------------------------------------------- tfkd, tfkd-self


@pytest.mark.parametrize("case", cases("tfkd"))
def test_tfkd_reg_and_self_equal_the_public_losses(case):
    x = inputs(case)
    c = x["logits"].shape[1]
    m = method(case["project"]["method"], project_options(case), num_classes=c)
    teacher_out = {"logits": x["teacher"]} if "teacher" in x else None
    terms = m.loss_terms({"logits": x["logits"], "aux": None}, x["labels"], StepInfo(0, 1), teacher_out)
    close(terms["ss"] + terms["tfkd"], case["expected"]["total"])


def test_tfkd_self_default_is_the_public_loss_with_multiplier_c():
    # the public multiplier 50 (ResNet-18 config, C = 100) gives half the default's KD term
    by_name = {c["name"]: c for c in fixture("tfkd")["cases"]}
    assert by_name["self_multiplier_100"]["project"]["options"] == {"alpha": 0.95, "temperature": 6.0}
    half, full = by_name["self_multiplier_50"], by_name["self_multiplier_100"]
    x = inputs(full)
    m = method("tfkd-self", {"alpha": 0.95, "temperature": 6.0}, num_classes=100)
    terms = m.loss_terms({"logits": x["logits"], "aux": None}, x["labels"], StepInfo(0, 1), {"logits": x["teacher"]})
    ce = terms["ss"]
    close(terms["tfkd"] / 2, half["expected"]["total"] - float(ce))


# ----------------------------------------------------------------------------- sad


def test_sad_equals_the_enet_sad_port():
    case = fixture("sad")["cases"][0]
    x = inputs(case)
    stages = [x[f"stage_{i}"] for i in (1, 2, 3, 4)]
    close(sad_loss(stages), case["expected"]["sad_sum"])
    m = method("sad", {}, stage_channels=[s.shape[1] for s in stages], num_classes=3)
    out = {"logits": torch.zeros(2, 3, 8, 8), "aux": None, "stages": stages}
    terms = m.loss_terms(out, torch.zeros(2, 8, 8, dtype=torch.long), StepInfo(10, 10))
    close(terms["sad"], case["expected"]["sad_weighted"])


# ----------------------------------------------------------------------------- srss


def test_srss_terms_equal_the_public_code_and_defaults_are_its_weights_over_0_8():
    case = fixture("srss")["cases"][0]
    x = inputs(case)
    exp = case["expected"]
    main, exits = x["main"], [x["exit_1"], x["exit_2"], x["exit_3"]]
    presences = [x["presence_main"], x["presence_1"], x["presence_2"], x["presence_3"]]
    labels, c = x["labels"], x["main"].shape[1]
    classification = sum(presence_loss(p, class_presence(labels, c)) for p in presences)
    segmentation = sum(pixel_ce(o, labels) for o in [main, *exits])
    sr_l = sr_presence_loss(presences[0], presences[1:])
    sr_f = sr_feature_loss(exits[0], [*exits[1:], main], labels)
    close(classification, exp["classification"])
    close(segmentation, exp["segmentation"])
    close(sr_l, exp["sr_l"])
    close(sr_f, exp["sr_f"])
    o = SelfRegulation.Options()
    ours = (pixel_ce(main, labels) + o.exit_weight * sum(pixel_ce(e, labels) for e in exits)
            + o.presence_weight * classification + o.srf_weight * sr_f + o.srl_weight * sr_l)
    close(0.8 * ours, exp["total"])


# ----------------------------------------------------------------------------- tffd


def test_tffd_intra_layer_value_and_gradient_equal_intra_fd():
    case = next(c for c in fixture("tffd")["cases"] if c["name"] == "intra")
    x = inputs(case)
    exp = case["expected"]
    ref_grad = torch.tensor(exp["grad"]).reshape(x["feature"].shape)
    salient = exp["salient_channels"]
    others = [k for k in range(x["feature"].shape[1]) if k not in salient]
    assert ref_grad[:, salient].abs().sum() > 0  # the public term does move the salient half

    # default (public): no stop-gradient -- same value, same gradient everywhere
    f = x["feature"].clone().requires_grad_(True)
    value = intra_layer_loss(f)
    value.backward()
    close(value, exp["intra"])
    torch.testing.assert_close(f.grad, ref_grad, rtol=REL, atol=1e-8)

    # intra_detach_salient: same value, the salient half gets no gradient, the other half the same one
    g = x["feature"].clone().requires_grad_(True)
    value = intra_layer_loss(g, detach_salient=True)
    value.backward()
    close(value, exp["intra"])
    assert torch.count_nonzero(g.grad[:, salient]) == 0
    torch.testing.assert_close(g.grad[:, others], ref_grad[:, others], rtol=REL, atol=1e-8)


def test_tffd_method_gradient_follows_intra_detach_salient():
    case = next(c for c in fixture("tffd")["cases"] if c["name"] == "intra")
    x = inputs(case)
    salient = case["expected"]["salient_channels"]
    grads = {}
    for detach in (False, True):
        m = method("tffd", {"intra_detach_salient": detach, "inter_weight": 0.0, "intra_weight": 1.0},
                   stage_channels=[6], num_classes=3)
        f = x["feature"].clone().requires_grad_(True)
        terms = m.loss_terms({"logits": torch.zeros(2, 3, 3, 3), "aux": None, "stages": [f]},
                             torch.zeros(2, 3, 3, dtype=torch.long), StepInfo(9, 10))
        terms["intra"].backward()
        grads[detach] = f.grad
    ref_grad = torch.tensor(case["expected"]["grad"]).reshape(x["feature"].shape)
    torch.testing.assert_close(grads[False], ref_grad, rtol=REL, atol=1e-8)
    assert torch.count_nonzero(grads[True][:, salient]) == 0


def test_tffd_defaults_with_truncation_equal_the_public_tfd_loss():
    case = next(c for c in fixture("tffd")["cases"] if c["name"] == "tfd_three_stages")
    x = inputs(case)
    exp = case["expected"]
    stages = [x["rb1"], x["rb2"], x["rb3"]]
    out = {"logits": torch.zeros(2, 3, 8, 8), "aux": None, "stages": stages}
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    after_ramp = StepInfo(9, 10)
    m = method("tffd", project_options(case), stage_channels=[16, 32, 64], num_classes=3)
    terms = m.loss_terms(out, labels, after_ramp)
    close(terms["intra"] + terms["inter"], exp["kd_loss"])
    # the derivation: with unit weights the two terms are the public unweighted means themselves
    unit = method("tffd", {**project_options(case), "intra_weight": 1.0, "inter_weight": 1.0},
                  stage_channels=[16, 32, 64], num_classes=3).loss_terms(out, labels, after_ramp)
    close(unit["intra"], exp["intra_mean"])
    close(unit["inter"], exp["inter_mean"])


# ----------------------------------------------------------------------------- rdd


def test_rdd_stage_one_equals_the_public_weighted_ce():
    case = next(c for c in fixture("rdd")["cases"] if c["name"] == "tfe_stage")
    x = inputs(case)
    m = method("rdd", project_options(case))
    assert m.in_tfe_stage(StepInfo(0, 10))
    terms = m.loss_terms({"logits": x["student"], "aux": x["student_aux"]}, x["labels"], StepInfo(0, 10),
                         {"logits": x["teacher"], "aux": x["teacher_aux"]})
    assert set(terms) == {"ss_tfe", "aux_tfe"}
    close(terms["ss_tfe"] + terms["aux_tfe"], case["expected"]["tfe"])


TSE_COMBINE = {"XOR": "xor", "OR": "or", "AND": "and", "OHEM": "student"}


@pytest.mark.parametrize("case", [c for c in cases("rdd") if c.values[0]["name"].startswith("tse_")])
@pytest.mark.parametrize("public", sorted(TSE_COMBINE))
def test_rdd_stage_two_equals_public_ohem_masks(case, public):
    x = inputs(case)
    frac = case["project"]["options"]["ohem_min_kept"]
    assert int(frac * int((x["labels"] != 255).sum())) == case["min_kept_pixels"]  # same k as the public min_kept
    m = method("rdd", {"ohem_thresh": 0.7, "ohem_min_kept": frac, "tse_combine": TSE_COMBINE[public]})
    step = StepInfo(9, 10)
    assert not m.in_tfe_stage(step)
    terms = m.loss_terms({"logits": x["student"], "aux": None}, x["labels"], step, {"logits": x["teacher"]})
    close(terms["ss_tse"], case["expected"][public])
