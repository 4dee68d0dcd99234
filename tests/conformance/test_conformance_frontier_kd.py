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
from types import SimpleNamespace

import pytest
import torch

from sdesbench.methods import METHODS
from sdesbench.methods.afdcd import center_keep_mask, omni_contrastive_loss
from sdesbench.methods.base import MethodContext, StepInfo
from sdesbench.methods.kl_ls import logit_standardized_kd_loss, zscore_over_classes
from sdesbench.methods.mgd import masked_generation_loss, mgd_logit_loss, mgd_loss, random_keep_mask
from test_conformance import cases, close, fixture, inputs, method, project_options

REQUIRED = {"kl-ls": {"T2_C5", "T1_C19"}, "mgd": {"align_4_to_6", "same_channels", "logit_term"},
            "afdcd": {"r18_script_enhanced_random", "plain_center_mask", "groups4_patch2_pool2"}}


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


# ----------------------------------------------------------------------------- mgd and afdcd: the reference's mask


def replayed_keep(case: dict, ratio: float) -> torch.Tensor:
    """The mask the reference drew: the first torch.rand of a generator seeded with the fixture's mask seed."""
    b, _, h, w = inputs(case)["teacher"].shape
    uniform = torch.rand((b, 1, h, w), generator=torch.Generator().manual_seed(case["mask"]["seed"]))
    keep = random_keep_mask(uniform, ratio)
    assert int(keep.sum()) == case["mask"]["kept_positions"]
    return keep


def set_conv(conv: torch.nn.Conv2d, x: dict, name: str) -> None:
    with torch.no_grad():
        conv.weight.copy_(x[f"{name}_weight"])
        conv.bias.copy_(x[f"{name}_bias"])


def feature_method(name: str, case: dict, x: dict, **options):
    """The method on a fake student/teacher whose last stages have the fixture's channel counts."""
    cs, ct = x["student"].shape[1], x["teacher"].shape[1]
    teacher = SimpleNamespace(stage_channels=[4, ct], decoder_channels=4)
    return method(name, {**project_options(case), **options}, stage_channels=(4, cs), teacher=teacher)


@pytest.mark.parametrize("case", [c for c in cases("mgd") if "mgd" in c.values[0]["expected"]])
def test_mgd_equals_feature_loss_with_the_reference_mask(case):
    x = inputs(case)
    m = feature_method("mgd", case, x)
    g = m.generator_block
    assert (g.align is None) == (x["student"].shape[1] == x["teacher"].shape[1])  # FeatureLoss's rule
    if g.align is not None:
        set_conv(g.align, x, "align")
    set_conv(g.generation[0], x, "gen1")
    set_conv(g.generation[2], x, "gen2")
    keep = replayed_keep(case, m.opts.mgd_lambda)
    close(m.opts.mgd_alpha * mgd_loss(g, x["student"], x["teacher"], keep), case["expected"]["mgd"])


def test_mgd_logit_term_equals_the_segmentation_distiller():
    case = next(c for c in fixture("mgd")["cases"] if c["name"] == "logit_term")
    x = inputs(case)
    opts = METHODS.get("mgd").Options()
    assert (opts.mgd_logit_weight, opts.mgd_logit_tau) == (3.0, 4.0)  # the distiller's constants are the defaults
    close(opts.mgd_logit_weight * mgd_logit_loss(x["student_logits"], x["teacher_logits"], opts.mgd_logit_tau),
          case["expected"]["mgd_logit"])


AFDCD_CONVS = {"enhanced": {"block1": "block_1.0", "block2": "block_2.0", "adaptor1": "adaptor_1",
                            "adaptor2": "adaptor_2"},
               "plain": {"proj1": "0", "proj2": "2"}}


@pytest.mark.parametrize("case", cases("afdcd"))
def test_afdcd_equals_omni_contrastive_feature_loss(case):
    x = inputs(case)
    m = feature_method("afdcd", case, x)
    o = m.opts
    g = m.generator_block
    set_conv(g.align, x, "align")
    for short, path in AFDCD_CONVS[o.afdcd_projector].items():
        set_conv(g.generation.get_submodule(path), x, short)
    b, _, h, w = x["teacher"].shape
    keep = replayed_keep(case, o.afdcd_mask_ratio) if o.afdcd_mask == "random" else center_keep_mask(b, h, w)
    generated = g(x["student"], keep)
    close(masked_generation_loss(generated, x["teacher"]), case["expected"]["afdcd_fd"])
    close(omni_contrastive_loss(generated, x["teacher"], o.afdcd_groups, o.afdcd_patch, o.afdcd_pool, o.afdcd_tau),
          case["expected"]["afdcd_ctr"])


def test_afdcd_defaults_are_what_the_r18_script_runs():
    o = METHODS.get("afdcd").Options()
    assert (o.afdcd_fd_weight, o.afdcd_ctr_weight, o.afdcd_mask_ratio) == (2e-6, 0.005, 0.75)
    assert (o.afdcd_mask, o.afdcd_projector) == ("random", "enhanced")  # type=bool: "False" -> True
    assert (o.afdcd_tau, o.afdcd_groups, o.afdcd_pool, o.afdcd_patch) == (0.07, 16, 4, 4)
    assert (o.kd_weight, o.kd_temperature) == (1.0, 1.0)


# ----------------------------------------------------------------------------- the methods' own masks


def two_steps(name: str, seed: int, rank: int, **options):
    """The method's term on fixed maps at two iterations, built like the Trainer builds it for (seed, rank)."""
    gen = torch.Generator().manual_seed(5)
    s = {"logits": torch.randn(2, 3, 8, 8, generator=gen), "aux": None,
         "stages": [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 8, 8, 8, generator=gen)]}
    t = {"logits": torch.randn(2, 3, 8, 8, generator=gen),
         "stages": [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)]}
    teacher = SimpleNamespace(stage_channels=[4, 16], decoder_channels=4)
    model = SimpleNamespace(stage_channels=[4, 8], decoder_channels=4)
    ctx = MethodContext(model=model, num_classes=3, total_iters=2, class_pixel_counts=lambda: None, teacher=teacher,
                        seed=seed, rank=rank)
    cls = METHODS.get(name)
    torch.manual_seed(0)  # the module weights: the same for every (seed, rank)
    m = cls(cls.parse_options(options, 3), ctx)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    with torch.no_grad():
        return [m.loss_terms(s, labels, StepInfo(k, 2), t) for k in range(2)]


@pytest.mark.parametrize("name,term", [("mgd", "mgd"), ("afdcd", "afdcd_fd")])
def test_masks_come_from_the_methods_generator(name, term):
    options = {"afdcd_groups": 4, "afdcd_patch": 2, "afdcd_pool": 0} if name == "afdcd" else {}
    a, b = two_steps(name, 1, 0, **options), two_steps(name, 1, 0, **options)
    other_rank = two_steps(name, 1, 1, **options)
    assert set(a[0]) == set(METHODS.get(name).logged_terms)
    assert [float(s[term]) for s in a] == [float(s[term]) for s in b]  # same seed and rank: same masks
    assert float(a[0][term]) != float(a[1][term])  # a new mask every iteration
    assert float(a[0][term]) != float(other_rank[0][term])  # another rank: another mask


def test_afdcd_contrast_on_maps_the_reference_cannot_take():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 8, 10, 11, generator=gen), torch.randn(2, 8, 10, 11, generator=gen)
    # rows and columns beyond the last whole 4 x 4 patch are left out
    close(omni_contrastive_loss(s, t, 4, 4, 0), float(omni_contrastive_loss(s[..., :8, :8], t[..., :8, :8], 4, 4, 0)))
    # a window larger than the map shrinks to its smaller side (10 x 10 here, max_pool2d's floor drops the 11th
    # column): one position, one 1 x 1 patch, the contrast over the groups only
    one = omni_contrastive_loss(s, t, 4, 4, 16)
    ps, pt = s[..., :10].amax((2, 3)).reshape(2, 4, 2), t[..., :10].amax((2, 3)).reshape(2, 4, 2)
    sim = -torch.cdist(ps, pt, p=1) / 0.07  # 2 x 4 x 4: every other group is a negative
    close(one, float((torch.logsumexp(sim, 2) - sim.diagonal(dim1=1, dim2=2)).sum() / 2))
