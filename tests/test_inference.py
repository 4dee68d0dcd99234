"""Sliding windows and test-time augmentation (engine/inference.py) against hand computations: a stub model
whose logits are a known function of the pixel's position and of its input's size, so that every window,
view, resize, flip and merge can be written out here, and the metric conventions (mAcc, absent classes) on
tiny confusion matrices counted by hand."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sdesbench.engine.inference import (Inference, cirkd_view_size, mmseg_view_size, predictions,
                                        slide_windows)
from sdesbench.engine.metrics import ConfusionMatrix
from sdesbench.models import SegmentationModel

B, C, D, K = 0.3, 0.05, -0.02, 0.4  # the stub's class-1 logit: B + C * stage width + D * stage height + K * column


class RampDecoder(nn.Module):
    def forward(self, stages):
        s = stages[-1]
        n, _, h, w = s.shape
        ramp = B + C * w + D * h + K * torch.arange(w, dtype=s.dtype)
        one = ramp.expand(n, h, w)
        return {"logits": torch.stack([torch.zeros_like(one), one], 1), "decoder_feature": s}


class RampModel(SegmentationModel):
    """Two classes; ignores the image's content. Its single stage is the input subsampled by 2 (ceil), on which
    the decoder's class-1 logit is the ramp above (class 0: 0); `forward` upsamples it to the input's size."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.decoder = RampDecoder()

    def encode(self, x):
        return [x[:, :, ::2, ::2]]


class MarkLabels:
    """An extra prediction that reads the labels, as SDES's Ens-T does: the student's logits + 5 on class 0
    wherever the label is 1."""

    def eval_predictions(self, out, labels):
        return {"marked": out["logits"] + 5.0 * torch.stack([(labels == 1).to(out["logits"].dtype),
                                                              torch.zeros_like(labels, dtype=out["logits"].dtype)], 1)}


def resize_1d(values: list[float], n: int, align_corners: bool) -> list[float]:
    """Linear interpolation of `values` to `n` samples, written out: source position i (m-1)/(n-1) with
    align_corners, else (i + 0.5) m / n - 0.5 clamped at 0; the right neighbour clamped at the last sample."""
    m, out = len(values), []
    for i in range(n):
        src = (i * (m - 1) / (n - 1) if n > 1 else 0.0) if align_corners else max((i + 0.5) * m / n - 0.5, 0.0)
        i0 = min(int(src), m - 1)
        i1, t = min(i0 + 1, m - 1), src - i0
        out.append((1 - t) * values[i0] + t * values[i1])
    return out


def head_ramp(h_in: int, w_in: int) -> list[float]:
    """The decoder's class-1 logits along a row for an input of h_in x w_in (stage: ceil halves)."""
    hs, ws = math.ceil(h_in / 2), math.ceil(w_in / 2)
    return [B + C * ws + D * hs + K * j for j in range(ws)]


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


H, W = 5, 9  # the label's (and the image's) size
LABELS = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 0, 255]] * H)  # asymmetric: a flip that forgot the labels shows


def run(how: Inference, method=None, labels=LABELS):
    image = torch.rand(1, 3, H, W, dtype=torch.float64)
    return predictions(RampModel().eval(), image, labels[None], method, None, how)


def row(t: torch.Tensor, c: int) -> list[float]:
    """Class c's scores along the first row (every row is the same: the stub is constant down a column)."""
    assert torch.allclose(t[0, c], t[0, c, :1].expand_as(t[0, c]), atol=1e-12)
    return t[0, c, 0].tolist()


def test_mmsegmentation_windows_by_hand():
    # side 11 with crop 4 every 3 (3 does not divide 11 - 4): 4 windows, the last moved back from 9..13 to 7..11
    assert slide_windows(5, 11, (8, 4), (8, 3)) == [(0, 5, 0, 4), (0, 5, 3, 7), (0, 5, 6, 10), (0, 5, 7, 11)]
    # a side smaller than the crop (5 < 8) gets one window covering it; a stride dividing the size: no move
    assert slide_windows(64, 64, (32, 32), (16, 16)) == [(y, y + 32, x, x + 32) for y in (0, 16, 32)
                                                          for x in (0, 16, 32)]
    assert slide_windows(3, 3, (4, 4), (2, 2)) == [(0, 3, 0, 3)]
    assert slide_windows(11, 4, (4, 4), (3, 3)) == [(0, 4, 0, 4), (3, 7, 0, 4), (6, 10, 0, 4), (7, 11, 0, 4)]


def test_view_sizes_follow_mmcv_and_cirkd_rounding():
    # mmcv: target (int(9 * .5 + .5), int(5 * .5 + .5)) = (5, 3), f = min(5 / 9, 3 / 5) = 5/9, sides int(x f + .5)
    assert mmseg_view_size(5, 9, 0.5) == (3, 5) and cirkd_view_size(5, 9, 0.5) == (2, 4)
    assert mmseg_view_size(5, 9, 1.5) == (8, 14) and cirkd_view_size(5, 9, 1.5) == (7, 13)
    assert mmseg_view_size(5, 9, 1.0) == (5, 9) == cirkd_view_size(5, 9, 1.0)
    # keep_ratio's single factor differs from rounding each side: 5 x 7 at 0.3 -> target (2, 2), f = 2/7 -> 1 x 2
    assert mmseg_view_size(5, 7, 0.3) == (1, 2)
    assert mmseg_view_size(45, 60, 0.75) == (34, 45) and cirkd_view_size(45, 60, 0.75) == (33, 45)


def test_sliding_window_logits_equal_the_hand_computed_average():
    how = Inference(mode="slide", crop=(8, 4), stride=(8, 3))
    # 9 wide, crop 4 every 3: (9 - 4 + 3 - 1) // 3 + 1 = 3 windows, the last moved back from 6..10 to 5..9
    windows = [(0, 4), (3, 7), (5, 9)]
    assert [(x1, x2) for _, _, x1, x2 in slide_windows(H, W, (8, 4), (8, 3))] == windows
    # every window is 5 (the whole height: 5 < 8) x 4: its logits are the head's ramp upsampled to 4 columns
    window = resize_1d(head_ramp(5, 4), 4, align_corners=False)
    expected = []
    for x in range(W):
        covering = [window[x - x1] for x1, x2 in windows if x1 <= x < x2]
        expected.append(sum(covering) / len(covering))
    got = run(how, MarkLabels())
    assert row(got["student"], 1) == pytest.approx(expected, abs=1e-12)
    assert row(got["student"], 0) == pytest.approx([0.0] * W, abs=1e-12)
    # the extra prediction of each window read that window's labels: stitched, +5 where the label is 1
    marked = got["marked"][0, 0]
    assert torch.allclose(marked, 5.0 * (LABELS == 1).double(), atol=1e-12)
    assert torch.allclose(got["marked"][0, 1], got["student"][0, 1], atol=1e-12)


@pytest.mark.parametrize("rule", ["mmseg", "cirkd"])
def test_multi_scale_flip_equals_the_hand_computed_merge(rule):
    scales = (0.5, 1.0, 1.5)
    how = Inference(scales=scales, flip=True, tta_rule=rule)
    assert how.views() == [(0.5, False), (0.5, True), (1.0, False), (1.0, True), (1.5, False), (1.5, True)]
    # view sizes (H x W) by hand: mmcv's keep-ratio rounding, or CIRKD's floor
    sizes = [(3, 5), (5, 9), (8, 14)] if rule == "mmseg" else [(2, 4), (5, 9), (7, 13)]
    views = []  # each view's class-1 logits along a row at the label's width, flipped back when mirrored
    for hv, wv in sizes:
        if rule == "mmseg":  # the model upsamples the head to the view (align_corners=False), then to the label
            at_label = resize_1d(resize_1d(head_ramp(hv, wv), wv, False), W, False)
        else:  # CIRKD: from the head's output straight to the label's size, align_corners=True
            at_label = resize_1d(head_ramp(hv, wv), W, True)
        # the stub ignores the image, so the mirrored input gives the same logits; flipped back they mirror
        views += [at_label, at_label[::-1]]
    got = run(how, MarkLabels())
    mark = [5.0 if v == 1 else 0.0 for v in LABELS[0].tolist()]
    if rule == "mmseg":  # mean of softmax probabilities (two classes: class 1's is sigmoid(l1 - l0))
        p1 = [sum(sigmoid(v[x]) for v in views) / 6 for x in range(W)]
        marked_p0 = [sum(1 - sigmoid(v[x] - mark[x]) for v in views) / 6 for x in range(W)]
        assert row(got["student"], 1) == pytest.approx(p1, abs=1e-12)
        assert row(got["student"], 0) == pytest.approx([1 - p for p in p1], abs=1e-12)
        assert row(got["marked"], 0) == pytest.approx(marked_p0, abs=1e-12)
    else:  # mean of logits
        mean = [sum(v[x] for v in views) / 6 for x in range(W)]
        assert row(got["student"], 1) == pytest.approx(mean, abs=1e-12)
        assert row(got["marked"], 0) == pytest.approx(mark, abs=1e-12)  # each view's labels were its own (mirrored)
        assert row(got["marked"], 1) == pytest.approx(mean, abs=1e-12)


def test_flip_alone_and_whole_image_stay_the_plain_pass():
    plain = run(Inference())["student"]
    ramp = resize_1d(head_ramp(H, W), W, False)
    assert row(plain, 1) == pytest.approx(ramp, abs=1e-12)  # logits, not probabilities, without TTA
    flip = run(Inference(flip=True, tta_rule="cirkd"))["student"]
    # CIRKD's single scale is not the suite's: align_corners=True from the head's 5 columns to 9
    cirkd = resize_1d(head_ramp(H, W), W, True)
    assert row(flip, 1) == pytest.approx([(a + b) / 2 for a, b in zip(cirkd, cirkd[::-1])], abs=1e-12)


def test_ens_t_style_extras_see_mirrored_labels_in_a_mirrored_view():
    # with the labels not mirrored for the flipped view, class 0's +5 would land on the mirrored columns
    got = run(Inference(flip=True, tta_rule="cirkd"), MarkLabels())["marked"]
    assert row(got, 0) == pytest.approx([5.0 if v == 1 else 0.0 for v in LABELS[0].tolist()], abs=1e-12)


def test_mean_accuracy_and_predicted_but_absent_class_by_hand():
    # 3 classes; target / prediction of 5 labelled pixels (+1 ignored). Class 2 is predicted once, never labelled.
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 1, 2, 0]), torch.tensor([0, 0, 1, 1, 1, 255]))
    r = cm.compute()
    # class 0: TP 1, labelled 2, predicted 1 -> IoU 1/2, acc 1/2; class 1: TP 2, labelled 3, predicted 3 -> IoU 2/4,
    # acc 2/3; class 2: TP 0, labelled 0, predicted 1 -> IoU 0/1 = 0 (in the mean), acc undefined (left out)
    assert r["per_class_iou"] == [0.5, 0.5, 0.0]
    assert r["per_class_acc"] == [0.5, pytest.approx(2 / 3), None]
    assert r["miou"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert r["macc"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert r["pixel_acc"] == pytest.approx(3 / 5)


def test_absent_class_skipped_or_counted_zero_by_hand():
    # 4 classes; class 3 is in neither labels nor predictions (union 0)
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 1, 2, 2]))
    # class 0: TP 1, union 2 -> 1/2; class 1: TP 2, union 3 -> 2/3; class 2: TP 2, union 2 -> 1; class 3: 0/0
    skip, zero = cm.compute("skip"), cm.compute("zero")
    assert skip["per_class_iou"] == zero["per_class_iou"] == [0.5, pytest.approx(2 / 3), 1.0, None]
    assert skip["miou"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)  # mmsegmentation: over the 3 present classes
    assert zero["miou"] == pytest.approx((0.5 + 2 / 3 + 1.0 + 0.0) / 4)  # CIRKD's SegmentationMetric: over all 4
    assert skip["macc"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    # mmsegmentation's nan_to_num=0 zeroes the undefined accuracy of class 3 (never labelled) in mAcc too
    assert zero["macc"] == pytest.approx((1 / 2 + 1 + 1 + 0) / 4)
    # every class present: both conventions agree (full CamVid / Cityscapes val)
    full = ConfusionMatrix(3)
    full.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]))
    assert full.compute("skip")["miou"] == full.compute("zero")["miou"]
    assert full.compute("skip")["macc"] == full.compute("zero")["macc"]


def test_dice_and_fscore_follow_mmsegmentation_by_hand():
    # 4 classes, rows = labels: class 0: TP 2, FN 1 (-> 1), FP 1 (from 2); class 1: TP 1, FP 1 (from 0);
    # class 2: labelled twice, predicted 0 and 1, never right (TP 0); class 3: in neither
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 0, 1, 1, 0, 1]), torch.tensor([0, 0, 0, 1, 2, 2]))
    r = cm.compute("skip")
    # Dice = 2 TP / (predicted + labelled): class 0: 4 / (3 + 3); class 1: 2 / (3 + 1); class 2: 0 / (0 + 2)
    assert r["per_class_dice"] == [pytest.approx(4 / 6), pytest.approx(2 / 4), 0.0, None]
    assert r["mdice"] == pytest.approx((4 / 6 + 2 / 4 + 0) / 3)
    # F1 = 2 p r / (p + r): class 0: p = 2/3, r = 2/3 -> 2/3; class 1: p = 1/3, r = 1 -> 1/2; class 2: p = 0/0
    # (never predicted) -> undefined; class 3 undefined. mmsegmentation's nanmean: over classes 0 and 1
    assert r["per_class_fscore"] == [pytest.approx(2 / 3), pytest.approx(1 / 2), None, None]
    assert r["mfscore"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    zero = cm.compute("zero")  # nan_to_num=0: the undefined ones count 0 over all 4 classes
    assert zero["mdice"] == pytest.approx((4 / 6 + 2 / 4) / 4) and zero["mfscore"] == pytest.approx((2 / 3 + 1 / 2) / 4)
    # labelled and predicted, never right: precision = recall = 0, and mmsegmentation's f_score gives 0/0 = NaN
    q = ConfusionMatrix(2)
    q.update(torch.tensor([1, 0, 0]), torch.tensor([0, 1, 0]))
    assert q.compute()["per_class_fscore"] == [pytest.approx(2 * 0.5 * 0.5 / 1.0), None]
