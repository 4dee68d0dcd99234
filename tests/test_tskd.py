"""Teacher-student methods (kl, at, cwd, rdd, rdd+kl, rdd+cwd): hand-computed losses, RDD masks, the frozen
teacher, and end-to-end CLI runs with a trained teacher (teacher first, then students) of every registered
teacher-student method (TS_METHODS, read from the registry; each logs the terms its class declares in
`logged_terms`). The other methods' losses are tested beside their files (test_cirkd_methods.py, test_cirkd.py,
test_skd.py).

Every expected number below is worked out in the comment beside it; ln = natural log.
"""
import copy
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import FAST, assert_one_line_error, read_json, run_cli
from sdesbench.config import ModelConfig
from sdesbench.engine.configure import build_config
from sdesbench.io import save_checkpoint
from sdesbench.engine.state import Hooks
from sdesbench.engine.trainer import Trainer, train
from sdesbench.errors import CheckpointError, ConfigError, SdesbenchError
from sdesbench.experiments.plan import Sweep
from sdesbench.methods.at import AT, attention_transfer_loss, paired_stages
from sdesbench.methods.base import MethodContext, StepInfo
from sdesbench.methods.cwd import CWD, cwd_loss
from sdesbench.methods.kl import KL, hinton_kd_loss
from sdesbench.methods.teacher_student import TeacherStudentMethod
from sdesbench.methods.rdd import (RDD, RDDKL, ohem_hard_mask, tfe_pixel_weights, tfe_weighted_ce, tse_masked_ce,
                                   tse_pixel_mask)
from sdesbench.models import build_model
from sdesbench.methods import METHODS

LN3 = math.log(3.0)
# every registered teacher-student method, so a new one is trained end to end without editing this list
TS_METHODS = [n for n in METHODS.names() if issubclass(METHODS.get(n), TeacherStudentMethod)]
# FAST, made smaller still (later --set wins): one teacher and every teacher-student method share one test
TINY = [*FAST, "--set", "data.batch_size=2", "--set", "data.crop=32", "--set", "eval.max_images=2"]


def logits_1x(*pixels):
    """B=1, C=len(pixel), H=1, W=len(pixels) logits from per-pixel class scores."""
    return torch.tensor(pixels, dtype=torch.float32).t().reshape(1, len(pixels[0]), 1, len(pixels))


def binary_logits_with_prob(*probs):
    """Two-class logits whose class-0 probability is each p: scores [ln(p/(1-p)), 0]."""
    return logits_1x(*[[math.log(p / (1 - p)), 0.0] for p in probs])


def fake_ctx(num_classes=2, teacher=None, model=None):
    model = model or SimpleNamespace(decoder_channels=4, stage_channels=[3, 5])
    return MethodContext(model=model, num_classes=num_classes, total_iters=4, class_pixel_counts=lambda: None,
                         teacher=teacher)


def build_method(name, ctx=None, **options):
    cls = METHODS.get(name)
    return cls(cls.parse_options(options), ctx or fake_ctx())


# ----------------------------------------------------------------------------- kl


def test_kl_hand_computed_over_valid_pixels_and_over_all():
    # T = 2. Teacher [0, 0] -> p_T = (1/2, 1/2). Student [2 ln3, 0] / T = [ln3, 0] -> p_S = (3/4, 1/4).
    # KL(p_T || p_S) = 1/2 ln(0.5/0.75) + 1/2 ln(0.5/0.25) = 1/2 ln(4/3).
    # Pixels: 0 differs (label 0), 1 identical (label 1, KL 0), 2 differs but is ignored (255).
    student = logits_1x([2 * LN3, 0], [1.0, -1.0], [2 * LN3, 0])
    teacher = logits_1x([0, 0], [1.0, -1.0], [0, 0])
    labels = torch.tensor([[[0, 1, 255]]])
    valid = labels != 255
    # valid mean: T^2 * (1/2 ln(4/3) + 0) / 2 = 4 * 1/4 ln(4/3) = ln(4/3)
    assert hinton_kd_loss(student, teacher, 2.0, valid).item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    # all-pixel mean (CIRKD's batchmean): 4 * (2 * 1/2 ln(4/3)) / 3 = 4/3 ln(4/3)
    assert hinton_kd_loss(student, teacher, 2.0).item() == pytest.approx(4 / 3 * math.log(4 / 3), rel=1e-6)
    # the method's term is kd_weight times that
    kl = build_method("kl", kd_weight=0.5, kd_temperature=2.0)
    terms = kl.loss_terms({"logits": student, "aux": None}, labels, StepInfo(0, 1), {"logits": teacher})
    assert terms["kd"].item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert set(terms) == {"ss", "kd"}


def test_kl_is_zero_when_student_matches_teacher():
    z = torch.randn(2, 5, 3, 4)
    labels = torch.randint(0, 5, (2, 3, 4))
    assert hinton_kd_loss(z.clone(), z, 4.0, labels != 255).item() == pytest.approx(0.0, abs=1e-6)
    terms = build_method("kl").loss_terms({"logits": z, "aux": None}, labels, StepInfo(0, 1), {"logits": z.clone()})
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)


def test_kl_gradient_reaches_the_student_only():
    s = torch.randn(1, 3, 2, 2, requires_grad=True)
    t = torch.randn(1, 3, 2, 2, requires_grad=True)
    hinton_kd_loss(s, t, 1.0).backward()
    assert s.grad is not None and t.grad is None


# ----------------------------------------------------------------------------- at


def test_at_hand_computed():
    # Student: 2 channels, both [1, 1] -> Q = mean_c A^2 = [1, 1] -> q = [1/sqrt2, 1/sqrt2].
    # Teacher: channel 0 [2, 0], channel 1 [0, 0] -> Q = [(4+0)/2, 0] = [2, 0] -> q = [1, 0].
    # sum of squared differences = (1/sqrt2 - 1)^2 + (1/sqrt2)^2 = 2 - sqrt2; mean over 2 positions: 1 - 1/sqrt2.
    student = torch.tensor([[[[1.0, 1.0]], [[1.0, 1.0]]]])
    teacher = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)


def test_at_resizes_student_map_to_teacher_size():
    # Student 1x1 (any value) resized to 2x2 is constant -> q = [1/2, 1/2, 1/2, 1/2].
    # Teacher 2x2 with one active position: q = [1, 0, 0, 0].
    # squared differences: (1/2)^2 + 3 (1/2)^2 = 1; mean over 4 positions = 1/4. Channel counts differ (3 vs 1).
    student = torch.full((1, 3, 1, 1), 0.7)
    teacher = torch.tensor([[[[5.0, 0.0], [0.0, 0.0]]]])
    assert attention_transfer_loss(student, teacher).item() == pytest.approx(0.25, rel=1e-6)


def test_at_pairs_stages_from_the_deepest():
    student, teacher = ["s1", "s2", "s3"], ["t1", "t2", "t3", "t4"]
    assert paired_stages(student, teacher) == [("s1", "t2"), ("s2", "t3"), ("s3", "t4")]
    assert paired_stages(student, teacher, pairs=1) == [("s3", "t4")]


def test_at_is_zero_when_student_matches_teacher_and_weighted_sum_over_pairs():
    stages = [torch.randn(2, 4, 6, 6), torch.randn(2, 8, 3, 3)]
    assert attention_transfer_loss(stages[0].clone(), stages[0]).item() == pytest.approx(0.0, abs=1e-7)
    at = build_method("at", at_weight=10.0)
    labels = torch.zeros(2, 6, 6, dtype=torch.long)
    out = {"logits": torch.randn(2, 3, 6, 6), "aux": None, "stages": stages}
    assert at.loss_terms(out, labels, StepInfo(0, 1), {"stages": [s.clone() for s in stages]})["at"].item() == \
        pytest.approx(0.0, abs=1e-6)
    other = [torch.randn(2, 4, 6, 6), torch.randn(2, 8, 3, 3)]
    expected = 10.0 * sum(attention_transfer_loss(s, t).item() for s, t in zip(stages, other))
    assert at.loss_terms(out, labels, StepInfo(0, 1), {"stages": other})["at"].item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- cwd


def test_cwd_hand_computed():
    # tau = 2, B = 1, C = 2 channels over 2 positions (H=1, W=2).
    # Channel 0: teacher [0, 0] -> (1/2, 1/2); student [2 ln3, 0] / 2 -> (3/4, 1/4): KL = 1/2 ln(4/3).
    # Channel 1: identical -> KL = 0.
    # L = tau^2 / (B*C) * sum = 4 / 2 * 1/2 ln(4/3) = ln(4/3).
    student = torch.tensor([[[[2 * LN3, 0.0]], [[0.3, 0.9]]]])
    teacher = torch.tensor([[[[0.0, 0.0]], [[0.3, 0.9]]]])
    assert cwd_loss(student, teacher, 2.0).item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    # normalised over positions, not channels: a per-position constant shift of a channel changes nothing
    assert cwd_loss(student + torch.tensor([5.0, -2.0]).view(1, 2, 1, 1), teacher, 2.0).item() == \
        pytest.approx(math.log(4 / 3), rel=1e-5)
    # CIRKD's normalisation by a 1-channel student (before its adapter): tau^2 / (B*1) * sum = 2 ln(4/3)
    assert cwd_loss(student, teacher, 2.0, norm_channels=1).item() == pytest.approx(2 * math.log(4 / 3), rel=1e-6)


def test_cwd_is_zero_when_student_matches_teacher():
    z = torch.randn(2, 6, 4, 5)
    assert cwd_loss(z.clone(), z, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    terms = build_method("cwd").loss_terms({"logits": z, "aux": None}, torch.zeros(2, 4, 5, dtype=torch.long),
                                           StepInfo(0, 1), {"logits": z.clone()})
    assert terms["cwd"].item() == pytest.approx(0.0, abs=1e-6)


def test_cwd_on_features_adds_adapter_only_when_channels_differ():
    student = SimpleNamespace(decoder_channels=4, stage_channels=[3, 5])
    same = SimpleNamespace(decoder_channels=4, stage_channels=[3, 5])
    wider = SimpleNamespace(decoder_channels=8, stage_channels=[3, 7])
    assert build_method("cwd", fake_ctx(model=student, teacher=same), cwd_on="decoder_feature").cwd.adapter is None
    m = build_method("cwd", fake_ctx(model=student, teacher=wider), cwd_on="decoder_feature")
    assert tuple(m.cwd.adapter.weight.shape) == (8, 4, 1, 1)
    assert build_method("cwd", fake_ctx(model=student, teacher=wider), cwd_on="last_stage").cwd.adapter.out_channels == 7
    with pytest.raises(ConfigError, match="cwd_adapter=never"):
        build_method("cwd", fake_ctx(model=student, teacher=wider), cwd_on="last_stage", cwd_adapter="never")
    with pytest.raises(ConfigError, match="cwd_on='pixels'"):
        build_method("cwd", cwd_on="pixels")
    with pytest.raises(ConfigError, match="cwd_channel_norm='both'"):
        build_method("cwd", cwd_channel_norm="both")
    # the adapter is trained: the CWD term sends it a gradient; features of other sizes are resized
    out_s = {"decoder_feature": torch.randn(1, 4, 3, 3)}
    out_t = {"decoder_feature": torch.randn(1, 8, 6, 6)}
    m.loss_terms({**out_s, "logits": torch.randn(1, 2, 6, 6), "aux": None}, torch.zeros(1, 6, 6, dtype=torch.long),
                 StepInfo(0, 1), out_t)["cwd"].backward()
    assert m.cwd.adapter.weight.grad is not None


# ----------------------------------------------------------------------------- rdd


def test_rdd_tfe_weights_hand_computed():
    # teacher pixel 0: [ln3, 0] -> p = (3/4, 1/4); pixel 1: [0, 0] -> p = (1/2, 1/2); labels [1, 0].
    teacher = logits_1x([LN3, 0.0], [0.0, 0.0])
    labels = torch.tensor([[[1, 0]]])
    # entropy: w = exp(-H) = exp(3/4 ln 3/4 + 1/4 ln 1/4) = (3/4)^(3/4) (1/4)^(1/4); uniform: exp(-ln2) = 1/2
    w = tfe_pixel_weights(teacher, None, labels, "entropy").flatten().tolist()
    assert w == pytest.approx([0.75 ** 0.75 * 0.25 ** 0.25, 0.5], rel=1e-6)
    # true_prob: p_T(y) = 1/4 (label 1 at pixel 0), 1/2
    assert tfe_pixel_weights(teacher, None, labels, "true_prob").flatten().tolist() == pytest.approx([0.25, 0.5])
    # aux_kl (public code): aux [0, 0] at pixel 0 vs main (3/4, 1/4): KL(aux||main) = 1/2 ln(4/3) -> w = (4/3)^(-1/2)
    #                       aux == main at pixel 1 -> w = 1
    aux = logits_1x([0.0, 0.0], [0.0, 0.0])
    assert tfe_pixel_weights(teacher, aux, labels, "aux_kl").flatten().tolist() == \
        pytest.approx([math.sqrt(3) / 2, 1.0], rel=1e-6)
    with pytest.raises(ValueError, match="aux head"):  # RDD refuses such a teacher when built (next test)
        tfe_pixel_weights(teacher, None, labels, "aux_kl")


def test_rdd_tfe_weighted_ce_hand_computed():
    # student [0, 0] everywhere -> CE = ln2 per pixel; labels [0, 1, 255], weights [1/2, 1, 7 (ignored pixel)]
    # L_TFE = (1/2 ln2 + 1 ln2) / 2 labelled pixels = 3/4 ln2
    student = torch.zeros(1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])
    weights = torch.tensor([[[0.5, 1.0, 7.0]]])
    assert tfe_weighted_ce(student, labels, weights).item() == pytest.approx(0.75 * math.log(2), rel=1e-6)


def test_rdd_ohem_and_tse_masks_hand_example():
    # 5 pixels, label 0 except the last (ignored). True-class probabilities:
    #   student 0.9 0.6 0.8 0.3 (.)   teacher 0.5 0.9 0.2 0.1 (.)
    labels = torch.tensor([[[0, 0, 0, 0, 255]]])
    student = binary_logits_with_prob(0.9, 0.6, 0.8, 0.3, 0.5)
    teacher = binary_logits_with_prob(0.5, 0.9, 0.2, 0.1, 0.5)
    # thresh 0.7, no min_kept: hard = p <= 0.7
    hs = ohem_hard_mask(student, labels, 0.7, 0.0)
    ht = ohem_hard_mask(teacher, labels, 0.7, 0.0)
    assert hs.flatten().tolist() == [False, True, False, True, False]
    assert ht.flatten().tolist() == [True, False, True, True, False]
    # min_kept 0.75 of 4 labelled pixels -> k = 3; 3rd smallest student prob = 0.8 > 0.7 -> threshold 0.8
    assert ohem_hard_mask(student, labels, 0.7, 0.75).flatten().tolist() == [False, True, True, True, False]
    # hard for exactly one of the two (xor), and the public code's other combinations
    assert tse_pixel_mask(hs, ht, "xor").flatten().tolist() == [True, True, True, False, False]
    assert tse_pixel_mask(hs, ht, "or").flatten().tolist() == [True, True, True, True, False]
    assert tse_pixel_mask(hs, ht, "and").flatten().tolist() == [False, False, False, True, False]
    assert tse_pixel_mask(hs, ht, "student").flatten().tolist() == hs.flatten().tolist()
    # L_TSE over the xor pixels 0, 1, 2: (-ln 0.9 - ln 0.6 - ln 0.8) / 3
    mask = tse_pixel_mask(hs, ht, "xor")
    expected = -(math.log(0.9) + math.log(0.6) + math.log(0.8)) / 3
    assert tse_masked_ce(student, labels, mask).item() == pytest.approx(expected, rel=1e-5)
    assert tse_masked_ce(student, labels, torch.zeros_like(mask)).item() == 0.0


def test_rdd_switches_from_tfe_to_tse_and_combines_with_kl():
    labels = torch.tensor([[[0, 0, 0, 0, 255]]])
    s = {"logits": binary_logits_with_prob(0.9, 0.6, 0.8, 0.3, 0.5), "aux": None}
    t = {"logits": binary_logits_with_prob(0.5, 0.9, 0.2, 0.1, 0.5), "aux": None}
    rdd = build_method("rdd", tfe_fraction=0.5, ohem_min_kept=0.0)
    assert set(rdd.loss_terms(s, labels, StepInfo(1, 4), t)) == {"ss_tfe"}  # iterations 0, 1 of 4
    tse = rdd.loss_terms(s, labels, StepInfo(2, 4), t)
    assert set(tse) == {"ss_tse"}
    assert tse["ss_tse"].item() == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.8)) / 3, rel=1e-5)
    # stage 1 with a teacher without aux head uses the entropy weights (auto)
    w = tfe_pixel_weights(t["logits"], None, labels, "entropy")
    tfe = rdd.loss_terms(s, labels, StepInfo(0, 4), t)["ss_tfe"]
    assert tfe.item() == pytest.approx(tfe_weighted_ce(s["logits"], labels, w).item(), rel=1e-6)
    both = build_method("rdd+kl", tfe_fraction=0.5, ohem_min_kept=0.0).loss_terms(s, labels, StepInfo(3, 4), t)
    assert set(both) == {"ss_tse", "kd"}
    assert both["kd"].item() == pytest.approx(hinton_kd_loss(s["logits"], t["logits"], 1.0, labels != 255).item())
    assert set(build_method("rdd+cwd").loss_terms(s, labels, StepInfo(3, 4), t)) == {"ss_tse", "cwd"}


def test_rdd_aux_kl_refuses_a_teacher_without_aux_head():
    teacher = SimpleNamespace(aux_head=None)
    with pytest.raises(ConfigError, match="aux head"):
        build_method("rdd", fake_ctx(teacher=teacher), tfe_difficulty="aux_kl")
    with pytest.raises(ConfigError, match="tse_combine='nand'"):
        build_method("rdd", tse_combine="nand")


def test_teacher_student_method_flags_and_missing_teacher_outputs():
    for name in TS_METHODS:
        cls = METHODS.get(name)
        assert cls.needs_teacher is True and cls.teacher_free is False, name
    assert {KL, AT, CWD, RDD, RDDKL} <= {METHODS.get(n) for n in TS_METHODS}
    with pytest.raises(SdesbenchError, match="without teacher outputs"):
        build_method("kl").loss_terms({"logits": torch.zeros(1, 2, 1, 1), "aux": None}, torch.zeros(1, 1, 1).long(),
                                      StepInfo(0, 1), None)


# ----------------------------------------------------------------------------- the teacher in the Trainer


def save_fake_teacher(path, model_name="deeplabv3_resnet18", num_classes=11):
    torch.manual_seed(1)
    model = build_model(model_name, num_classes)
    save_checkpoint(path, {"model_name": model_name, "num_classes": num_classes, "model": model.state_dict(),
                           "iteration": 0, "config": {"model": {"name": model_name, "aux": False}}})
    return path


def tiny_cfg(tmp_path, method, ckpt, *extra):
    return build_config({}, [f"method.name={method}", "train.iters=1", "data.batch_size=2", "data.crop=32",
                             "eval.max_images=2", "teacher.model=deeplabv3_resnet18", f"teacher.checkpoint={ckpt}",
                             f"output.dir={tmp_path / 'out'}", *extra])


def test_teacher_runs_frozen_in_eval_mode_without_grad(tmp_path):
    ckpt = save_fake_teacher(tmp_path / "teacher.pt")
    trainer = Trainer(tiny_cfg(tmp_path, "kl", ckpt), show_progress=False)
    trainer.out.mkdir(parents=True)
    trainer.setup()
    learner = trainer.learner
    teacher_before = copy.deepcopy(learner.teacher.state_dict())
    student_before = copy.deepcopy(learner.model.state_dict())
    seen = {}
    loss_terms = learner.method.loss_terms

    def spy(student_out, labels, step, teacher_out=None):
        seen["teacher_out"] = teacher_out
        return loss_terms(student_out, labels, step, teacher_out)

    learner.method.loss_terms = spy
    trainer._loop(Hooks([]), trainer.view())
    assert trainer.state.iteration == 1
    teacher = learner.teacher
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not seen["teacher_out"]["logits"].requires_grad
    after = teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)  # BN running stats included
    assert any("running_mean" in k for k in teacher_before)
    # ... while the student did take a step and its BN statistics moved
    assert not all(torch.equal(student_before[k], v) for k, v in learner.model.state_dict().items())


def test_model_built_with_aux_runs_its_aux_head():
    # regression: a class attribute `aux_head = None` on SegmentationModel used to shadow the registered head
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="deeplabv3_resnet18", aux=True), 11)
    out = model(torch.randn(2, 3, 32, 32))
    assert out["aux"] is not None and tuple(out["aux"].shape) == (2, 11, 32, 32)
    assert model.aux_head is not None
    assert build_model("deeplabv3_resnet18", 11)(torch.randn(2, 3, 32, 32))["aux"] is None
    # a student with an aux head gets the aux CE beside the distillation term
    terms = build_method("kl", fake_ctx(num_classes=11)).loss_terms(out, torch.zeros(2, 32, 32, dtype=torch.long),
                                                                    StepInfo(0, 1), {"logits": out["logits"]})
    assert set(terms) == {"ss", "aux", "kd"}


def test_teacher_of_wrong_class_count_is_refused(tmp_path):
    ckpt = save_fake_teacher(tmp_path / "teacher5.pt", num_classes=5)
    with pytest.raises(CheckpointError) as e:
        train(tiny_cfg(tmp_path, "cwd", ckpt), show_progress=False)
    msg = str(e.value)
    assert "has 5 classes, the dataset has 11" in msg and "\n" not in msg


def test_teacher_trained_with_aux_head_loads_and_feeds_rdd_aux_kl(tmp_path):
    torch.manual_seed(1)
    model = build_model(ModelConfig(name="deeplabv3_resnet18", aux=True), 11)
    ckpt = tmp_path / "teacher_aux.pt"
    save_checkpoint(ckpt, {"model_name": "deeplabv3_resnet18", "num_classes": 11, "model": model.state_dict(),
                           "iteration": 0, "config": {"model": {"name": "deeplabv3_resnet18", "aux": True}}})
    rec = train(tiny_cfg(tmp_path, "rdd", ckpt, "method.tfe_difficulty=aux_kl"), show_progress=False).to_dict()
    assert rec["status"] == "completed"


def test_sdesbench_run_plans_one_teacher_first_for_table3_teacher_rows(tmp_path):
    plans = Sweep("table3", "smoke", (0,), tmp_path).plans()
    assert plans[0].is_teacher and plans[0].cfg.method.name == "student"
    teachers = [p for p in plans if p.is_teacher]
    assert len(teachers) == 1
    ckpt = str(teachers[0].out / "checkpoints" / "last.pt")
    students = [p for p in plans if p.cfg is not None and p.cfg.method.name in ("kl", "at", "cwd")]
    assert students and all(p.cfg.teacher.checkpoint == ckpt and p.depends_on == [str(teachers[0].out)]
                            for p in students)


# ----------------------------------------------------------------------------- end to end through the CLI

def e2e_options(name: str) -> dict:
    """A method's options in the end-to-end spec, from the options it has: a staged method (RDD's TFE then TSE)
    switches half-way, so that 2 iterations log both stages; memory queues (CIRKD's, 20000 + 2000 embeddings per
    class at its defaults, 0.4 GB a checkpoint) are kept small; a channel-wise term also runs on the decoder
    feature through an adapter where it is not the method's only term (rdd+cwd)."""
    names = {n for n, _ in METHODS.get(name).option_docs()}
    out: dict = {}
    if "tfe_fraction" in names:
        out["tfe_fraction"] = 0.5
    if "cirkd_pixel_memory" in names:
        out.update(cirkd_pixel_memory=64, cirkd_region_memory=8, cirkd_pixel_contrast=64, cirkd_region_contrast=16)
    if "cirkdv2_channel_memory" in names:  # CIRKD v2's queue of teacher channels, likewise
        out.update(cirkdv2_channel_memory=512, cirkdv2_channel_contrast=16)
    if "cwd_on" in names and "tfe_fraction" in names:
        out.update(cwd_on="decoder_feature", cwd_adapter="always")
    return out


E2E_OPTIONS = {m: e2e_options(m) for m in TS_METHODS}


E2E_SPEC = """
title: teacher-student end-to-end check
metrics: [miou]
presets:
  smoke:
    data: {name: tiny}
options:
""" + "".join(f"  {m}: {json.dumps(o)}\n" for m, o in E2E_OPTIONS.items() if o) + """\
groups:
  - name: R18
    model: deeplabv3_resnet18
    rows:
""" + "".join(f"      - {{label: {m}, method: {m}, teacher: true}}\n" for m in TS_METHODS)


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    """`sdesbench run` on a spec with a row per teacher-student method: 1 teacher + one student each, 2 iterations."""
    root = tmp_path_factory.mktemp("tskd")
    (root / "specs").mkdir()
    (root / "specs" / "tskd_e2e.yaml").write_text(E2E_SPEC)
    old = os.environ.get("SDESBENCH_EXPERIMENTS")
    os.environ["SDESBENCH_EXPERIMENTS"] = str(root / "specs")
    try:
        proc = run_cli("run", "tskd_e2e", "--results", str(root / "results"), "--set", "train.iters=2",
                       "--set", "train.log_every=1", *TINY)
    finally:
        if old is None:
            os.environ.pop("SDESBENCH_EXPERIMENTS")
        else:
            os.environ["SDESBENCH_EXPERIMENTS"] = old
    return proc, root / "results" / "runs" / "tiny" / "deeplabv3_resnet18"


def test_run_trains_the_teacher_first_then_every_teacher_student_method(e2e_run):
    proc, runs = e2e_run
    assert proc.returncode == 0, proc.stderr
    (teacher_dir,) = list((runs / "student").iterdir())
    teacher = read_json(teacher_dir / "results.json")
    assert teacher["status"] == "completed" and teacher["iterations"] == 2
    order = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert "teacher:deeplabv3_resnet18" in order[0], order
    for m in TS_METHODS:
        (run_dir,) = list((runs / m).iterdir())
        rec = read_json(run_dir / "results.json")
        assert rec["status"] == "completed" and rec["iterations"] == 2, m
        assert rec["config"]["teacher"] == {"model": "deeplabv3_resnet18",
                                            "checkpoint": str(teacher_dir / "checkpoints" / "last.pt")}
        log = (run_dir / "log.jsonl").read_text()
        assert all(f'"{term}"' in log for term in METHODS.get(m).logged_terms), (m, log)
    # 2 iterations with tfe_fraction 0.5: TFE-RDD at iteration 1, TSE-RDD at iteration 2
    first, second = (next((runs / "rdd").iterdir()) / "log.jsonl").read_text().splitlines()
    assert '"ss_tfe"' in first and '"ss_tse"' in second


@pytest.fixture(scope="module")
def teacher_ckpt(e2e_run):
    _, runs = e2e_run
    (teacher_dir,) = list((runs / "student").iterdir())
    return teacher_dir / "checkpoints" / "last.pt"


def test_train_cli_with_set_teacher_checkpoint(teacher_ckpt, tmp_path):
    proc = run_cli("train", "--method", "rdd+cwd", "--iters", "2", "--set", "teacher.model=deeplabv3_resnet18",
                   "--set", f"teacher.checkpoint={teacher_ckpt}", "--set", "method.tfe_fraction=0.5",
                   *TINY, "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    rec = read_json(tmp_path / "s" / "results.json")
    assert rec["status"] == "completed" and rec["config"]["teacher"]["checkpoint"] == str(teacher_ckpt)


def test_teacher_of_wrong_architecture_is_one_line(teacher_ckpt, tmp_path):
    proc = run_cli("train", "--method", "kl", "--iters", "2", "--set", "teacher.model=deeplabv3_resnet50",
                   "--set", f"teacher.checkpoint={teacher_ckpt}", *TINY, "--out", str(tmp_path / "s"))
    assert_one_line_error(proc, "is a deeplabv3_resnet18, not the deeplabv3_resnet50")


def test_missing_teacher_checkpoint_is_one_line(tmp_path):
    proc = run_cli("train", "--method", "at", "--iters", "2", "--set", "teacher.model=deeplabv3_resnet18",
                   *TINY, "--out", str(tmp_path / "s"))
    assert_one_line_error(proc, "method 'at' needs teacher.checkpoint")
