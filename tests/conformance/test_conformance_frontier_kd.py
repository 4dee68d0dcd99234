"""kl-ls, mgd and afdcd (issue 27) against the numbers their public reference code produced on the same
seeded inputs.

Same contract as test_conformance.py: each fixture (`<method>.json` beside this file) names the
reference's repository, commit, path and call, the input recipe (`reference_inputs.make_inputs`) and the
outputs the reference returned, run once outside this repository. MGD's and Af-DCD's references draw
their random mask from torch's global generator right after `torch.manual_seed(mask.seed)`; the same
mask is the first draw of a CPU generator seeded alike, which the tests feed to the project's loss
through its `keep` argument (the method itself draws from its own generator).
"""
from __future__ import annotations

import re

import pytest
import torch

from sdesbench.methods import METHODS
from sdesbench.methods.base import StepInfo
from sdesbench.methods.kl_ls import logit_standardized_kd_loss, zscore_over_classes
from test_conformance import cases, close, fixture, inputs, method, project_options

REQUIRED = {"kl-ls": {"T2_C5", "T1_C19"}}


def test_frontier_fixtures_have_their_cases_and_provenance():
    for name, needed in REQUIRED.items():
        fx = fixture(name)
        assert fx["method"] == name and name in METHODS.names()
        assert METHODS.get(name).conformance == f"{name}.json"
        assert needed <= {c["name"] for c in fx["cases"]}, name
        for case in fx["cases"]:
            ref = case.get("reference", fx["reference"])
            assert ref["repo"] and ref["path"] and ref["function"] and re.fullmatch(r"[0-9a-f]{40}", ref["commit"])
            assert case["reference_call"] and case["expected"] and case["checksums"]


# ----------------------------------------------------------------------------- kl-ls


@pytest.mark.parametrize("case", cases("kl-ls"))
def test_kl_ls_equals_the_reference_applied_per_pixel(case):
    x = inputs(case)
    s, t, labels = x["student"], x["teacher"], x["labels"]
    opts = project_options(case)
    T = opts["kd_temperature"]
    close(logit_standardized_kd_loss(s, t, T), case["expected"]["kd_ls_all_pixels"])
    close(logit_standardized_kd_loss(s, t, T, labels != 255), case["expected"]["kd_ls_labelled_pixels"])
    # the method: its default averages over the labelled pixels; ls_valid_only=false over all of them
    classes = s.shape[1]
    for valid_only, key in ((True, "kd_ls_labelled_pixels"), (False, "kd_ls_all_pixels")):
        m = method("kl-ls", {"ls_temperature": T, "ls_weight": 1.0, "ls_valid_only": valid_only}, num_classes=classes)
        terms = m.loss_terms({"logits": s, "aux": None}, labels, StepInfo(0, 1), {"logits": t})
        assert set(terms) == set(type(m).logged_terms)
        close(terms["kd_ls"], case["expected"][key])
    # the repository's naive 4-D call standardises along W, not the classes: a different number, not ours
    naive = case["expected"]["naive_4d"]
    assert abs(naive - case["expected"]["kd_ls_all_pixels"]) > 0.05 * abs(naive)


def test_kl_ls_zscore_is_per_pixel_over_classes_and_population_std_is_algorithm_1():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 4, generator=gen) * 5 + 2
    z = zscore_over_classes(x, eps=0.0)
    assert torch.allclose(z.mean(1), torch.zeros(2, 3, 4), atol=1e-5)
    assert torch.allclose(z.std(1), torch.ones(2, 3, 4), atol=1e-5)
    zp = zscore_over_classes(x, "population", eps=0.0)
    assert torch.allclose(zp.pow(2).mean(1), torch.ones(2, 3, 4), atol=1e-5)  # Alg. 1: divisor C
    # magnitude-free: a student whose logits are the teacher's scaled and shifted per pixel has no loss
    scale, shift = torch.rand(2, 1, 3, 4, generator=gen) * 4 + 0.5, torch.randn(2, 1, 3, 4, generator=gen)
    assert float(logit_standardized_kd_loss(x * scale + shift, x, 2.0)) < 1e-6  # fp32 rounding of Z: ~1e-8
    assert float(logit_standardized_kd_loss(x * scale.flip(0) + shift, x, 2.0)) < 1e-6
    assert float(logit_standardized_kd_loss(x.flip(1), x, 2.0)) > 0.1  # other class order: a real loss
