"""`lsr`: label-smoothing regularisation (Szegedy et al., CVPR 2016, Sec. 7), per pixel.

The paper's tables list LSR as a teacher-free baseline (SDES, Tables 1-2): the one-hot target of
every labelled pixel is replaced by a smoothed one and the student is trained with the
cross-entropy to it. Nothing else changes (same model, no extra modules).
"""
from __future__ import annotations

from typing import Literal

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdesbench import IGNORE_INDEX
from sdesbench.config import rng
from sdesbench.methods.losses import valid_mask
from sdesbench.methods.base import METHODS
from sdesbench.methods.student import Student

Spread = Literal["all", "others"]  # all: uniform over all C classes; others: over the C - 1 wrong ones


def label_smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, epsilon: float, spread: Spread = "all",
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Szegedy et al. 2016, Sec. 7: H(q', p) with q'(k) = (1 - eps) delta(k, y) + eps u(k).

    spread="all" (the paper, and torch's `label_smoothing`): u is uniform over all C classes,
    the true one included, so the true class gets 1 - eps + eps/C. spread="others" (the form of
    the Tf-KD public code's `loss_label_smoothing`): the true class gets exactly 1 - eps and the
    other C - 1 classes eps/(C - 1) each. Per pixel the loss is
        (1 - eps) * (-log p_y) + eps * sum_k u(k) * (-log p_k),
    averaged over the non-ignored pixels (0 when every pixel is ignored). eps = 0 is Eq. 1.
    """
    valid = valid_mask(labels, ignore_index)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits.float(), dim=1)  # B x C x H x W
    num_classes = log_p.shape[1]
    nll = -log_p.gather(1, labels.clamp(0, num_classes - 1).unsqueeze(1)).squeeze(1)  # -log p_y
    sum_neg_log_p = -log_p.sum(1)  # sum_k -log p_k
    if spread == "all":
        smooth = sum_neg_log_p / num_classes
    else:
        smooth = (sum_neg_log_p - nll) / (num_classes - 1)
    per_pixel = (1.0 - epsilon) * nll + epsilon * smooth
    return per_pixel[valid].mean()


@METHODS.register("lsr")
class LabelSmoothing(Student):
    """L = H(q', p): the cross-entropy of Eq. 1 with label-smoothed targets (epsilon 0.1).

    Choices: smoothing uniform over all C classes including the true one (`spread: all`, the
    paper's u(k) = 1/K and torch's `label_smoothing`); `spread: others` is the alternative found in
    public KD code. Ignored pixels (255) carry no target and are excluded; mean over valid pixels.
    An auxiliary head, if the model has one, keeps the plain CE of `student`.
    """
    logged_terms = ("ss",)
    conformance = "lsr.json"
    option_prefix = ""

    @dataclass
    class Options(Student.Options):
        epsilon: float = field(default=0.1, metadata=rng(0.0, 1.0, doc="smoothing mass moved off the true class"))
        spread: Spread = "all"

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        terms = super().loss_terms(student_out, labels, step, teacher_out)
        terms["ss"] = label_smoothed_ce(student_out["logits"], labels, self.opts.epsilon, self.opts.spread)
        return terms
