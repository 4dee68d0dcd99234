"""The CIRKD-table methods of issue 21 (ifvd, dsd, fitnet, dist): each pure loss function against a hand
computation on tiny tensors, and the options that change what is computed.

Every expected number is worked out in the comment beside it; ln = natural log. (Agreement with the public
reference code is in tests/conformance/test_conformance_new_methods.py.)
"""
import math
from types import SimpleNamespace

import pytest
import torch

from sdesbench.errors import ConfigError, SdesbenchError
from sdesbench.methods import METHODS
from sdesbench.methods.base import MethodContext, StepInfo
from sdesbench.methods.dist import dist_loss, inter_class_relation, intra_class_relation, pearson_distance
from sdesbench.methods.dsd import csd_loss, map_pairs, psd_loss
from sdesbench.methods.fitnet import fitnet_hint_loss
from sdesbench.methods.ifvd import class_prototype_map, ifv_map, ifvd_loss
from sdesbench.methods.losses import labels_at

SQRT2 = math.sqrt(2.0)


def build(name, num_classes=3, model=None, teacher=None, **options):
    model = model or SimpleNamespace(decoder_channels=4, stage_channels=[3, 5])
    ctx = MethodContext(model=model, num_classes=num_classes, total_iters=4, class_pixel_counts=lambda: None,
                        teacher=teacher)
    cls = METHODS.get(name)
    return cls(cls.parse_options(options, num_classes), ctx)


def pixels(*vectors):
    """B=1 map of W=len(vectors) pixels in one row, one channel per entry of each vector: 1 x D x 1 x W."""
    return torch.tensor(vectors, dtype=torch.float32).t().reshape(1, len(vectors[0]), 1, len(vectors))


# that every teacher-student method needs a teacher is tested for all of them in test_tskd.py, and their option
# prefixes in test_method_api.py
def test_dist_without_teacher_outputs_is_an_error():
    with pytest.raises(SdesbenchError, match="without teacher outputs"):
        build("dist").loss_terms({"logits": torch.zeros(1, 3, 1, 1), "aux": None}, torch.zeros(1, 1, 1).long(),
                                 StepInfo(0, 1), None)


def test_labels_at_takes_the_nearest_label():
    # 2 x 4 -> 1 x 2: output (i, j) reads input (2i, 2j), so row 0, columns 0 and 2
    labels = torch.tensor([[[1, 2, 3, 255], [5, 6, 7, 8]]])
    assert labels_at(labels, (1, 2)).tolist() == [[[1, 3]]]
    assert labels_at(labels, (2, 4)) is labels


# ----------------------------------------------------------------------------- fitnet


def test_fitnet_hint_loss_hand_computed():
    # r(F_S) = [1, 2, 3, 4] against F_T = 0: squares 1, 4, 9, 16 (sum 30)
    student = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    teacher = torch.zeros(1, 1, 2, 2)
    assert fitnet_hint_loss(student, teacher).item() == pytest.approx(7.5)  # CIRKD: mean 30 / 4
    assert fitnet_hint_loss(student, teacher, "half_sum").item() == pytest.approx(15.0)  # FitNets: 1/2 * 30 per example


def test_fitnet_adapter_is_a_trained_module_and_never_mode_refuses_other_widths():
    student = SimpleNamespace(decoder_channels=4, stage_channels=[3, 5])
    wider = SimpleNamespace(decoder_channels=6, stage_channels=[3, 7])
    m = build("fitnet", model=student, teacher=wider)
    assert tuple(m.adapter.weight.shape) == (6, 4, 1, 1) and m.adapter.bias is None
    assert build("fitnet", model=student, teacher=student).adapter is not None  # always, as CIRKD
    assert build("fitnet", model=student, teacher=student, fitnet_adapter="auto").adapter is None
    assert build("fitnet", model=student, teacher=wider, fitnet_on="last_stage").adapter.out_channels == 7
    with pytest.raises(ConfigError, match="fitnet_adapter=never"):
        build("fitnet", model=student, teacher=wider, fitnet_adapter="never")
    # the adapter gets the hint gradient; a teacher map of another size: the regressed student map is resized
    out = {"logits": torch.randn(1, 3, 4, 4), "aux": None, "decoder_feature": torch.randn(1, 4, 2, 2)}
    terms = m.loss_terms(out, torch.zeros(1, 4, 4, dtype=torch.long), StepInfo(0, 1),
                         {"decoder_feature": torch.randn(1, 6, 4, 4)})
    assert set(terms) == {"ss", "fitnet"}
    terms["fitnet"].backward()
    assert m.adapter.weight.grad is not None and m.adapter.weight.grad.abs().sum() > 0


def test_fitnet_weight_and_identity_adapter():
    # an identity adapter: the term is fitnet_weight x the plain mean squared error, here 10 x 7.5
    same = SimpleNamespace(decoder_channels=1, stage_channels=[1])
    m = build("fitnet", model=same, teacher=same)
    with torch.no_grad():
        m.adapter.weight.fill_(1.0)
    feature = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    out = {"logits": torch.zeros(1, 3, 2, 2), "aux": None, "decoder_feature": feature}
    terms = m.loss_terms(out, torch.zeros(1, 2, 2, dtype=torch.long), StepInfo(0, 1),
                         {"decoder_feature": torch.zeros(1, 1, 2, 2)})
    assert terms["fitnet"].item() == pytest.approx(75.0)


# ----------------------------------------------------------------------------- ifvd

# student pixels f0 = (1, 0), f1 = (0, 1), f2 = (1, 1), f3 = (4, -2); labels 0, 0, 1, ignored.
# class-0 prototype (1/2, 1/2): cos(f0, c0) = (1/2) / (1 * 1/sqrt2) = 1/sqrt2, cos(f1, c0) = 1/sqrt2;
# class 1 holds f2 alone: cos 1; the ignored pixel keeps its own feature: cos 1.
STUDENT = pixels((1, 0), (0, 1), (1, 1), (4, -2))
# teacher (3 channels): class 0 = (2,0,0), (3,0,0), parallel: both cos 1; class 1 alone: 1; ignored: 1
TEACHER = pixels((2, 0, 0), (3, 0, 0), (0, 5, 0), (1, 2, 3))
LABELS = torch.tensor([[[0, 0, 1, 255]]])


def test_ifvd_prototypes_and_map_hand_computed():
    protos = class_prototype_map(STUDENT, LABELS, num_classes=2)
    assert protos[0, :, 0].t().tolist() == [[0.5, 0.5], [0.5, 0.5], [1.0, 1.0], [4.0, -2.0]]
    assert ifv_map(STUDENT, LABELS, 2).flatten().tolist() == pytest.approx([1 / SQRT2, 1 / SQRT2, 1.0, 1.0])
    assert ifv_map(TEACHER, LABELS, 2).flatten().tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])


def test_ifvd_loss_over_labelled_positions_and_over_all():
    # squared differences (1/sqrt2 - 1)^2 twice, 0, 0 (the ignored pixel is 1 on both sides)
    d = (1 - 1 / SQRT2) ** 2
    assert ifvd_loss(STUDENT, TEACHER, LABELS, 2).item() == pytest.approx(2 * d / 3, rel=1e-6)  # 3 labelled
    assert ifvd_loss(STUDENT, TEACHER, LABELS, 2, valid_only=False).item() == pytest.approx(2 * d / 4, rel=1e-6)
    m = build("ifvd", num_classes=2)
    terms = m.loss_terms({"logits": torch.zeros(1, 2, 1, 4), "aux": None, "decoder_feature": STUDENT}, LABELS,
                         StepInfo(0, 1), {"decoder_feature": TEACHER})
    assert terms["ifvd"].item() == pytest.approx(20 * 2 * d / 3, rel=1e-6)  # default weight 20 (CIRKD)
    everything_ignored = torch.full_like(LABELS, 255)
    assert ifvd_loss(STUDENT, TEACHER, everything_ignored, 2).item() == 0.0


def test_ifvd_reads_labels_at_the_feature_size_and_sends_gradient_to_the_student_only():
    # labels at twice the feature's width: nearest sampling reads columns 0, 2, 4, 6
    wide = torch.tensor([[[0, 1, 0, 1, 1, 0, 255, 0]]])
    assert labels_at(wide, (1, 4)).tolist() == LABELS.tolist()
    s = STUDENT.clone().requires_grad_(True)
    t = TEACHER.clone().requires_grad_(True)
    ifvd_loss(s, t, wide, 2).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


# ----------------------------------------------------------------------------- dist

# two pixels, three classes (logits = ln p, so softmax gives p back):
#   student p0 = (.5, .3, .2), p1 = (.2, .3, .5);  teacher q0 = (.2, .3, .5), q1 = (.5, .3, .2)
# inter: centred p0 = (1/6, -1/30, -2/15), q0 = (-2/15, -1/30, 1/6); dot = -4/90 + 1/900 = -39/900,
#   both norms sqrt(42/900): rho = -39/42 = -13/14, d = 27/14; pixel 1 is the mirror case: 27/14.
# intra: class 0 (.5,.2) vs (.2,.5): rho -1, d 2; class 1 (.3,.3) vs (.3,.3): centred to 0, rho 0 (the
#   1e-8), d 1; class 2: d 2. L_intra = 5/3.
P_S = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
P_T = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]])
INTER, INTRA = 27 / 14, 5 / 3


def as_logits(p, scale=1.0):
    """N x C probabilities -> 1 x C x 1 x N logits scale * ln p."""
    return (scale * p.log()).t().reshape(1, p.shape[1], 1, p.shape[0])


def test_pearson_distance_and_the_two_relations_hand_computed():
    u = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    v = torch.tensor([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0]])
    assert pearson_distance(u, v).tolist() == pytest.approx([0.0, 2.0], abs=1e-6)
    assert inter_class_relation(P_S, P_T).item() == pytest.approx(INTER, rel=1e-5)
    assert intra_class_relation(P_S, P_T).item() == pytest.approx(INTRA, rel=1e-5)


def test_dist_loss_weights_temperature_and_valid_pixels():
    s, t = as_logits(P_S), as_logits(P_T)
    assert dist_loss(s, t).item() == pytest.approx(INTER + INTRA, rel=1e-5)
    assert dist_loss(s, t, beta=2.0, gamma=0.5).item() == pytest.approx(2 * INTER + 0.5 * INTRA, rel=1e-5)
    # tau = 2 on logits 2 ln p: softmax(z / 2) = p again, and the loss is scaled by tau^2 = 4
    assert dist_loss(as_logits(P_S, 2.0), as_logits(P_T, 2.0), tau=2.0).item() == \
        pytest.approx(4 * (INTER + INTRA), rel=1e-5)
    # a third pixel, ignored: with valid pixels only the value is the two-pixel one
    s3 = torch.cat([s, torch.tensor([[[[3.0]], [[-1.0]], [[0.5]]]])], dim=3)
    t3 = torch.cat([t, torch.tensor([[[[0.0]], [[2.0]], [[0.0]]]])], dim=3)
    valid = torch.tensor([[[True, True, False]]])
    assert dist_loss(s3, t3, valid=valid).item() == pytest.approx(INTER + INTRA, rel=1e-5)
    assert dist_loss(s3, t3).item() != pytest.approx(INTER + INTRA, rel=1e-3)


def test_dist_method_aux_term_and_its_one_line_error():
    s, t = as_logits(P_S), as_logits(P_T)
    labels = torch.zeros(1, 1, 2, dtype=torch.long)
    m = build("dist")
    both = m.loss_terms({"logits": s, "aux": s}, labels, StepInfo(0, 1), {"logits": t, "aux": t})
    assert set(both) == {"ss", "aux", "dist", "dist_aux"}
    assert both["dist"].item() == pytest.approx(INTER + INTRA, rel=1e-5)
    assert both["dist_aux"].item() == pytest.approx(0.4 * (INTER + INTRA), rel=1e-5)  # the public 0.4
    no_aux = m.loss_terms({"logits": s, "aux": None}, labels, StepInfo(0, 1), {"logits": t, "aux": t})
    assert set(no_aux) == {"ss", "dist"}
    with pytest.raises(SdesbenchError, match="teacher has none") as e:
        m.loss_terms({"logits": s, "aux": s}, labels, StepInfo(0, 1), {"logits": t, "aux": None})
    assert "\n" not in str(e.value)
    off = build("dist", dist_aux_weight=0.0).loss_terms({"logits": s, "aux": s}, labels, StepInfo(0, 1),
                                                         {"logits": t, "aux": None})
    assert set(off) == {"ss", "aux", "dist"}
    weighted = build("dist", dist_weight=2.0).loss_terms({"logits": s, "aux": s}, labels, StepInfo(0, 1),
                                                          {"logits": t, "aux": t})
    assert weighted["dist_aux"].item() == pytest.approx(2 * 0.4 * (INTER + INTRA), rel=1e-5)


def test_dist_size_feature_reads_the_labels_on_the_decoder_grid():
    # input 1 x 4 pixels; decoder grid 1 x 2. Logits constant over pixel pairs (0,1) and (2,3), so the
    # bilinear resize to the grid gives exactly the two pixels P_S / P_T. Labels: pixel 0 ignored only,
    # read at the grid by nearest sampling (pixels 0 and 2) -> only the second grid pixel is labelled.
    s = as_logits(P_S).repeat_interleave(2, dim=3)
    t = as_logits(P_T).repeat_interleave(2, dim=3)
    labels = torch.tensor([[[255, 0, 0, 0]]])
    out = {"logits": s, "aux": None, "decoder_feature": torch.zeros(1, 4, 1, 2)}
    grid = build("dist", dist_size="feature", dist_valid_only=True).loss_terms(out, labels, StepInfo(0, 1),
                                                                              {"logits": t, "aux": None})
    # one labelled pixel, p1 vs q1: inter d = 27/14; intra over one pixel: every class centred to 0, d = 1
    assert grid["dist"].item() == pytest.approx(27 / 14 + 1.0, rel=1e-5)
    full = build("dist", dist_valid_only=True).loss_terms(out, labels, StepInfo(0, 1), {"logits": t, "aux": None})
    # at input size 3 labelled pixels (p0, p1, p1 vs q0, q1, q1): the intra correlations are -1 again (d 2, 1, 2)
    assert full["dist"].item() == pytest.approx(27 / 14 + 5 / 3, rel=1e-5)


# ----------------------------------------------------------------------------- dsd


def test_dsd_pairs():
    assert map_pairs(3) == [(0, 1), (0, 2), (1, 2)]  # CIRKD's n < m
    assert map_pairs(3, "adjacent") == [(0, 1), (1, 2)]
    assert map_pairs(2) == map_pairs(2, "adjacent") == [(0, 1)]


def test_psd_hand_computed():
    # 1 x 2 positions. Student: f0 = [3, 0] -> a0 = (1, 0); f1 = [0, 2] -> a1 = (0, 1);
    #   r01 = normalize(a1 - a0) = (-1, 1)/sqrt2.
    # Teacher (f1 with two channels, mean of squares (25, 0)): a0 = (0, 1), a1 = (1, 0): r01 = (1, -1)/sqrt2.
    # r^S - r^T = (-sqrt2, sqrt2): squares 2, 2, mean 2 (one pair).
    student = [torch.tensor([[[[3.0, 0.0]]]]), torch.tensor([[[[0.0, 2.0]]]])]
    teacher = [torch.tensor([[[[0.0, 1.0]]]]), torch.tensor([[[[5.0, 0.0]], [[5.0, 0.0]]]])]
    assert psd_loss(student, teacher, (1, 2)).item() == pytest.approx(2.0, rel=1e-6)
    assert psd_loss(student, [f.clone() for f in student], (1, 2)).item() == pytest.approx(0.0, abs=1e-7)


# CSD example on the decoder grid 2 x 4, two classes, tau = 4, teacher logits 0 (uniform):
#   class 0 logits 0; class 1 logits 4 ln3 on columns 0-1, 0 on columns 2-3.
#   2x2 pooling -> 1 x 2 positions: q0 = (1/2, 1/2), q1 = softmax(ln3, 0) = (3/4, 1/4).
#   G^S = [[1/2, 1/2], [1/2, 9/16 + 1/16 = 5/8]], G^T = 1/2 everywhere: one entry differs by 1/8,
#   L_CSD = (1/8)^2 / 4 = 1/256.
CLASS1 = 4 * math.log(3.0)
GRID_LOGITS = torch.tensor([[[[0.0] * 4] * 2, [[CLASS1, CLASS1, 0.0, 0.0]] * 2]])


def test_csd_hand_computed():
    assert tuple(GRID_LOGITS.shape) == (1, 2, 2, 4)
    assert csd_loss(GRID_LOGITS, torch.zeros_like(GRID_LOGITS)).item() == pytest.approx(1 / 256, rel=1e-5)


def test_dsd_resolution_maps_and_weights():
    # the same logits at input size 4 x 8 (each grid pixel a 2x2 block; the bilinear resize back to the
    # 2 x 4 grid is exact). At input size CSD pools to 2 x 4 = 8 positions: q0 = 1/8 each, q1 = 3/16 on 4
    # positions and 1/16 on 4: G11 = 4 (9 + 1)/256 = 5/32 against 1/8 = 4/32, the rest equal:
    # L_CSD = (1/32)^2 / 4 = 1/4096 -- 16 times smaller than on the grid (1/256): CSD depends on resolution.
    logits = GRID_LOGITS.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    feature = torch.ones(1, 4, 2, 4)
    student = {"logits": logits, "aux": None, "decoder_feature": feature}
    teacher = {"logits": torch.zeros_like(logits), "aux": None, "decoder_feature": feature.clone()}
    labels = torch.zeros(1, 4, 8, dtype=torch.long)
    on_grid = build("dsd", num_classes=2).loss_terms(student, labels, StepInfo(0, 1), teacher)
    assert set(on_grid) == {"ss", "psd", "csd"}
    assert on_grid["csd"].item() == pytest.approx(10 / 256, rel=1e-5)  # default weight 10 (CIRKD)
    at_input = build("dsd", num_classes=2, dsd_size="input", dsd_csd_weight=1.0).loss_terms(
        student, labels, StepInfo(0, 1), teacher)
    assert at_input["csd"].item() == pytest.approx(1 / 4096, rel=1e-5)
    with pytest.raises(SdesbenchError, match="dsd_maps=aux_feature_logits needs aux outputs"):
        build("dsd", num_classes=2, dsd_maps="aux_feature_logits").loss_terms(student, labels, StepInfo(0, 1), teacher)
    with pytest.raises(ConfigError, match="dsd_pairs='some'"):
        build("dsd", dsd_pairs="some")


def test_dsd_auto_maps_use_aux_only_when_both_have_it():
    m = build("dsd", num_classes=2, dsd_psd_weight=1.0)
    torch.manual_seed(0)
    s = {"logits": torch.randn(1, 2, 4, 4), "aux": torch.randn(1, 2, 4, 4), "decoder_feature": torch.randn(1, 3, 2, 2)}
    t = {"logits": torch.randn(1, 2, 4, 4), "aux": torch.randn(1, 2, 4, 4), "decoder_feature": torch.randn(1, 5, 2, 2)}
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    with_aux = m.loss_terms(s, labels, StepInfo(0, 1), t)["psd"]
    keys = ["aux", "decoder_feature", "logits"]
    assert with_aux.item() == pytest.approx(psd_loss([s[k] for k in keys], [t[k] for k in keys], (2, 2)).item())
    without = m.loss_terms(s, labels, StepInfo(0, 1), {**t, "aux": None})["psd"]
    keys = ["decoder_feature", "logits"]
    assert without.item() == pytest.approx(psd_loss([s[k] for k in keys], [t[k] for k in keys], (2, 2)).item())
    assert with_aux.item() != pytest.approx(without.item())
