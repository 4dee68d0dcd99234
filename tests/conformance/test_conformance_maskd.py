"""maskd-tokens and maskd (MasKD's two stages, issue 27) against the numbers hunto/MasKD's segmentation code
produced on the same seeded inputs (maskd.json: `MaskModule.forward_train` + `SegCrossEntropyLoss` as
train_mask_module.py sums them, and `MasKDLoss` with the tokens loaded from a file, as train_maskd.py calls it),
values and gradients; and how stage 2 takes its tokens from a stage-1 checkpoint."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sdesbench.errors import CheckpointError, ConfigError
from sdesbench.io import save_checkpoint
from sdesbench.methods import METHODS
from sdesbench.methods.base import MethodContext, StepInfo
from sdesbench.methods.maskd import receptive_masks
from test_conformance import REL, cases, close, fixture, inputs

GRAD_ATOL = 1e-7  # gradients of ~1e-2 summed over a few hundred float32 terms


def build(name: str, num_classes: int, teacher=None, read_artefacts: bool = False, **options):
    ctx = MethodContext(model=SimpleNamespace(), num_classes=num_classes, total_iters=1,
                        class_pixel_counts=lambda: None, teacher=teacher, read_artefacts=read_artefacts)
    cls = METHODS.get(name)
    return cls(cls.parse_options(options, num_classes), ctx)


def test_maskd_fixture_names_both_stages_and_its_provenance():
    fx = fixture("maskd")
    assert {n.strip() for n in fx["method"].split(",")} == {"maskd", "maskd-tokens"}
    assert METHODS.get("maskd").conformance == METHODS.get("maskd-tokens").conformance == "maskd.json"
    ref = fx["reference"]
    assert ref["repo"] == "hunto/MasKD" and re.fullmatch(r"b5af34f[0-9a-f]{33}", ref["commit"])
    assert ref["path"] == "segmentation/losses/maskd.py"
    assert {"C5_T3", "C19_T8", "B1_C4_T2"} <= {c["name"] for c in fx["cases"]}
    # the reference script's constants are the defaults
    opts = METHODS.get("maskd").Options()
    assert (opts.maskd_num_tokens, opts.maskd_dice_weight, opts.maskd_weight, opts.maskd_aux_weight) == (8, 1.0, 1.0, 0.4)


@pytest.mark.parametrize("case", cases("maskd"))
def test_stage_one_terms_and_token_gradient_equal_mask_module_and_its_ce(case):
    x, want = inputs(case), case["expected"]
    classes, t = x["teacher_logits"].shape[1], x["tokens"].shape[0]
    m = build("maskd-tokens", classes, maskd_num_tokens=t)
    with torch.no_grad():
        m.tokens.copy_(x["tokens"])
    terms = m.loss_terms({"logits": x["teacher_logits"], "aux": None}, x["labels"], StepInfo(0, 1))
    assert set(terms) == set(type(m).logged_terms)
    close(terms["tokens_ce"], want["ce"])
    close(terms["tokens_dice"], want["dice"])
    sum(terms.values()).backward()
    torch.testing.assert_close(m.tokens.grad, torch.tensor(want["stage1_grad_tokens"]), rtol=REL, atol=GRAD_ATOL)
    masks = receptive_masks(x["tokens"], x["teacher_logits"])
    close(masks.double().sum(), want["mask_sum"])
    close(masks.flatten()[0], want["mask_first"])


@pytest.mark.parametrize("case", cases("maskd"))
def test_stage_two_term_and_student_gradient_equal_maskd_loss(case):
    x, want = inputs(case), case["expected"]
    classes, t = x["teacher_logits"].shape[1], x["tokens"].shape[0]
    m = build("maskd", classes, maskd_num_tokens=t)
    m.tokens.copy_(x["tokens"])
    s = x["student_logits"].clone().requires_grad_(True)
    terms = m.loss_terms({"logits": s, "aux": None}, x["labels"], StepInfo(0, 1),
                         {"logits": x["teacher_logits"], "aux": None})
    assert set(terms) == set(type(m).logged_terms)
    close(terms["maskd"], want["maskd"])
    terms["maskd"].backward()
    close(s.grad.double().abs().sum(), want["maskd_grad_student_sum_abs"])
    close(s.grad.flatten()[0], want["maskd_grad_student_first"])


# ----------------------------------------------------------------------------- stage 2 reads stage 1's checkpoint


def stage_one_checkpoint(path, teacher: nn.Module, tokens: torch.Tensor, method: str = "maskd-tokens"):
    save_checkpoint(path, {"model": teacher.state_dict(), "method": {"tokens": tokens},
                           "config": {"method": {"name": method}}})
    return str(path)


def test_stage_two_takes_the_tokens_of_a_stage_one_run_on_its_teacher_and_refuses_others(tmp_path):
    torch.manual_seed(0)
    teacher, other = nn.Conv2d(3, 5, 1), nn.Conv2d(3, 5, 1)
    tokens = torch.randn(4, 5)
    good = stage_one_checkpoint(tmp_path / "good.pt", teacher, tokens)
    m = build("maskd", 5, teacher=teacher, read_artefacts=True, maskd_num_tokens=4, maskd_tokens=good)
    assert torch.equal(m.tokens, tokens) and not m.tokens.requires_grad
    assert "tokens" in m.state_dict()  # travels in the student's checkpoint, so a restore needs no stage-1 file
    with pytest.raises(ConfigError, match="maskd_tokens: maskd distils with the receptive tokens"):
        build("maskd", 5, teacher=teacher, read_artefacts=True, maskd_num_tokens=4)
    with pytest.raises(CheckpointError, match="on another teacher"):
        build("maskd", 5, teacher=other, read_artefacts=True, maskd_num_tokens=4, maskd_tokens=good)
    with pytest.raises(CheckpointError, match="holds 4 tokens over 5 classes; this run has maskd_num_tokens=8"):
        build("maskd", 5, teacher=teacher, read_artefacts=True, maskd_tokens=good)
    kl = stage_one_checkpoint(tmp_path / "kl.pt", teacher, tokens, method="kl")
    with pytest.raises(CheckpointError, match="is not a maskd-tokens checkpoint"):
        build("maskd", 5, teacher=teacher, read_artefacts=True, maskd_num_tokens=4, maskd_tokens=kl)
