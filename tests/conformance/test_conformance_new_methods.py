"""CIRKD-table methods (issue 21: ifvd, dsd, fitnet, dist) against the numbers their public reference
code produced on the same seeded inputs.

Same contract as test_conformance.py: each fixture (`<method>.json` beside this file) names the
reference's repository, commit, path and call, the input recipe (`reference_inputs.make_inputs`) and
the outputs the reference returned, run once outside this repository; the project's loss, with the
options the fixture names, must give the same numbers to 1e-5 (relative).
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from sdesbench.methods import METHODS
from sdesbench.methods.base import StepInfo
from sdesbench.methods.dist import dist_loss
from sdesbench.methods.ifvd import ifvd_loss
from sdesbench.methods.losses import labels_at
from test_conformance import cases, close, fixture, inputs, method, project_options

REQUIRED = {"ifvd": {"labels_at_twice_the_feature_size", "labels_at_feature_size"}, "dsd": {"aux_feature_logits"},
            "fitnet": {"adapter"}, "dist": {"logits", "beta2_gamma05", "train_script_with_aux"}}


def test_every_new_method_has_its_cases_and_provenance():
    for name, needed in REQUIRED.items():
        fx = fixture(name)
        assert fx["method"] == name and name in METHODS.names()
        assert needed <= {c["name"] for c in fx["cases"]}, name
        ref = fx["reference"]
        assert ref["repo"] and ref["path"] and ref["function"] and re.fullmatch(r"[0-9a-f]{40}", ref["commit"])
        assert fx["matches_with"]
        for case in fx["cases"]:
            assert case["reference_call"] and case["expected"] and case["checksums"]


# ----------------------------------------------------------------------------- ifvd


@pytest.mark.parametrize("case", cases("ifvd"))
def test_ifvd_equals_cirkd_over_all_positions_and_default_is_the_mean_over_labelled_ones(case):
    x = inputs(case)
    classes = next(s["classes"] for s in case["inputs"] if s["op"] == "labels")
    assert project_options(case)["ifvd_valid_only"] is False
    close(ifvd_loss(x["student"], x["teacher"], x["labels"], classes, valid_only=False), case["expected"]["ifvd"])
    # the method (its default weight set to 1 by the fixture) on the same maps, as decoder features
    m = method("ifvd", project_options(case), num_classes=classes)
    out = {"logits": torch.zeros(2, classes, *x["labels"].shape[-2:]), "aux": None}
    terms = m.loss_terms({**out, "decoder_feature": x["student"]}, x["labels"], StepInfo(0, 1),
                         {"decoder_feature": x["teacher"]})
    close(terms["ifvd"], case["expected"]["ifvd"])
    # ignored positions add 0 to CIRKD's mean: the default divides the same sum by the labelled ones only
    at_feature = labels_at(x["labels"], x["teacher"].shape[-2:])
    share = float((at_feature != 255).float().mean())
    assert 0 < share < 1
    close(ifvd_loss(x["student"], x["teacher"], x["labels"], classes), case["expected"]["ifvd"] / share)
    assert METHODS.get("ifvd").Options().ifvd_valid_only is True


# ----------------------------------------------------------------------------- dsd


def test_dsd_psd_and_csd_equal_cirkd_double_sim_kd():
    case = fixture("dsd")["cases"][0]
    x = inputs(case)
    m = method("dsd", project_options(case), num_classes=5)
    student = {"aux": x["student_aux"], "decoder_feature": x["student_feature"], "logits": x["student_logits"]}
    teacher = {"aux": x["teacher_aux"], "decoder_feature": x["teacher_feature"], "logits": x["teacher_logits"]}
    labels = torch.zeros(2, 6, 7, dtype=torch.long)
    terms = m.loss_terms(student, labels, StepInfo(0, 1), teacher)
    close(terms["psd"], case["expected"]["psd"])
    close(terms["csd"], case["expected"]["csd"])
    # auto picks the same three maps when both sides have aux outputs
    auto = method("dsd", {**project_options(case), "dsd_maps": "auto"}, num_classes=5)
    close(auto.loss_terms(student, labels, StepInfo(0, 1), teacher)["psd"], case["expected"]["psd"])


# ----------------------------------------------------------------------------- fitnet


def test_fitnet_equals_cirkd_criterion_fitnet_with_the_same_adapter():
    case = fixture("fitnet")["cases"][0]
    x = inputs(case)
    c_s, c_t = x["student"].shape[1], x["teacher"].shape[1]
    teacher = SimpleNamespace(decoder_channels=c_t, stage_channels=[4, 8])
    m = method("fitnet", project_options(case), decoder_channels=c_s, teacher=teacher)
    with torch.no_grad():
        m.adapter.weight.copy_(x["adapter_weight"])
    out = {"logits": torch.zeros(2, 5, 5, 7), "aux": None, "decoder_feature": x["student"]}
    terms = m.loss_terms(out, torch.zeros(2, 5, 7, dtype=torch.long), StepInfo(0, 1), {"decoder_feature": x["teacher"]})
    close(terms["fitnet"], case["expected"]["fitnet"])


# ----------------------------------------------------------------------------- dist


@pytest.mark.parametrize("case", [c for c in cases("dist") if "student_aux" not in
                                  {s["name"] for s in c.values[0]["inputs"]}])
def test_dist_function_equals_the_public_dist(case):
    x = inputs(case)
    o = METHODS.get("dist").parse_options(project_options(case))
    close(dist_loss(x["student"], x["teacher"], o.dist_beta, o.dist_gamma, o.dist_tau), case["expected"]["dist"])
    m = method("dist", project_options(case))
    terms = m.loss_terms({"logits": x["student"], "aux": None}, torch.zeros(2, 6, 7, dtype=torch.long),
                         StepInfo(0, 1), {"logits": x["teacher"], "aux": None})
    close(terms["dist"], case["expected"]["dist"])


def test_dist_defaults_equal_the_public_training_script_with_its_aux_term():
    case = next(c for c in fixture("dist")["cases"] if c["name"] == "train_script_with_aux")
    assert project_options(case) == {}  # the defaults themselves
    x = inputs(case)
    m = method("dist", {})
    terms = m.loss_terms({"logits": x["student"], "aux": x["student_aux"]}, torch.zeros(2, 6, 7, dtype=torch.long),
                         StepInfo(0, 1), {"logits": x["teacher"], "aux": x["teacher_aux"]})
    assert set(terms) == {"ss", "aux", "dist", "dist_aux"}
    close(terms["dist"] + terms["dist_aux"], case["expected"]["kd_loss"])
