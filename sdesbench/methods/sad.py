"""`sad`: self-attention distillation (Hou et al., "Learning Lightweight Lane Detection CNNs by Self
Attention Distillation", ICCV 2019) between consecutive encoder stages.

Each stage's attention map is the sum over channels of |activation|^p (the paper's G^p_sum, p = 2),
bilinearly resized and turned into a distribution over positions by a spatial softmax; the map of
stage m is pulled (MSE) towards the map of the next deeper stage m + 1. Like the paper, the term is
switched on only after a warm-up (the attention of an untrained model carries no information).
"""
from __future__ import annotations

from typing import Literal

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdesbench.config import rng
from sdesbench.errors import ConfigError
from sdesbench.methods.base import METHODS
from sdesbench.methods.student import Student

Reduction = Literal["mean", "sum"]  # over the positions of an attention map


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """SAD Eq. 1, G^p_sum(A) = sum_c |A_c|^p: B x C x H x W -> B x 1 x H x W."""
    return feature.float().abs().pow(p).sum(1, keepdim=True)


def spatial_softmax(att: torch.Tensor) -> torch.Tensor:
    """Phi in SAD: softmax over all H x W positions of each image (B x 1 x H x W -> same shape)."""
    b, _, h, w = att.shape
    return F.softmax(att.reshape(b, -1), dim=1).reshape(b, 1, h, w)


def sad_pair_loss(shallow: torch.Tensor, deep: torch.Tensor, p: float = 2.0, detach_target: bool = True,
                  reduction: Reduction = "mean") -> torch.Tensor:
    """SAD Eq. 2 for one pair: L_d(Psi(A_m), Psi(A_{m+1})), Psi = Phi(B(G^p_sum(A))), L_d = squared L2.

    The deeper map G(A_{m+1}) is bilinearly resized (B) to the shallower map's size -- sizes may be
    equal (output stride 8) or not, and need not be square -- then both are spatially soft-maxed.
    The deeper map is the target and, by default, detached (the paper calls A_{m+1} the
    distillation target; the ENet-SAD public code lets gradients reach both). reduction="mean":
    mean over positions and batch (F.mse_loss, as public code); "sum": summed over positions,
    mean over the batch (values of a spatial softmax are ~1/(HW), so "mean" is very small).
    """
    a_m = attention_map(shallow, p)
    a_next = attention_map(deep, p)
    if a_next.shape[-2:] != a_m.shape[-2:]:
        a_next = F.interpolate(a_next, size=a_m.shape[-2:], mode="bilinear", align_corners=False)
    source, target = spatial_softmax(a_m), spatial_softmax(a_next)
    if detach_target:
        target = target.detach()
    sq = (source - target).pow(2)
    if reduction == "sum":
        return sq.flatten(1).sum(1).mean()
    return sq.mean()


def sad_loss(stages: list[torch.Tensor], first_stage: int = 0, p: float = 2.0, detach_target: bool = True,
             reduction: Reduction = "mean") -> torch.Tensor:
    """SAD Eq. 3 restricted to the encoder: sum over consecutive pairs (m, m + 1), m >= first_stage."""
    pairs = range(first_stage, len(stages) - 1)
    return sum((sad_pair_loss(stages[m], stages[m + 1], p, detach_target, reduction) for m in pairs),
               stages[0].new_zeros((), dtype=torch.float32))


def warm(step, warmup_fraction: float) -> bool:
    """True once `warmup_fraction` of the training iterations have passed."""
    return step.iteration >= warmup_fraction * step.total_iters


@METHODS.register("sad")
class SelfAttentionDistillation(Student):
    """L = CE (Eq. 1) + weight * sum_m ||Psi(A_m) - Psi(A_{m+1})||^2 after the warm-up.

    Defaults: weight 0.1 (the paper's SAD coefficient), p = 2, all consecutive encoder stages,
    switched on at half of training (`warmup_fraction` 0.5; the paper adds SAD to a model that is
    already trained "to a reasonable level" and reports training instability without warm-up).
    Before the warm-up ends the `sad` term is logged as 0. Choices: deeper map detached, resized
    to the shallower map (bilinear) before the softmax, MSE mean (see `sad_pair_loss`).
    """
    logged_terms = ("ss", "sad")
    conformance = "sad.json"
    option_prefix = ""

    @dataclass
    class Options(Student.Options):
        weight: float = field(default=0.1, metadata=rng(0.0, doc="weight of the SAD term"))
        warmup_fraction: float = field(default=0.5, metadata=rng(0.0, 1.0, doc="fraction of training before SAD starts"))
        p: float = field(default=2.0, metadata=rng(1.0, doc="exponent of G^p_sum"))
        first_stage: int = field(default=0, metadata=rng(0, doc="first encoder stage of the distilled pairs"))
        detach_target: bool = True  # the deeper attention map is a fixed target
        reduction: Reduction = "mean"

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        if options.first_stage >= len(ctx.model.stage_channels) - 1:
            raise ConfigError(f"method.first_stage={options.first_stage} leaves no stage pair: the model has "
                              f"{len(ctx.model.stage_channels)} encoder stages")

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        terms = super().loss_terms(student_out, labels, step, teacher_out)
        o = self.opts
        if warm(step, o.warmup_fraction):
            terms["sad"] = o.weight * sad_loss(student_out["stages"], o.first_stage, o.p, o.detach_target, o.reduction)
        else:
            terms["sad"] = student_out["logits"].new_zeros((), dtype=torch.float32)
        return terms
