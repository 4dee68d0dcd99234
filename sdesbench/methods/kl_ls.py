"""`kl-ls`: pixel-wise KD on Z-scored logits (Sun et al., "Logit Standardization in Knowledge Distillation",
CVPR 2024), applied to every pixel of a segmentation map.

The paper replaces the shared temperature of KD by a per-sample one: each logit vector z (over the K
classes) goes through the Z-score of its Algorithm 1 before the softmax,

    Z(z; T) = (z - mean(z)) / (T * std(z)),   q = softmax(Z(z; T))                       (Alg. 1)

and the student is trained on lambda * T^2 * KL(q^T || q^S). Here every pixel i is one sample: its C
class logits are standardised over the classes, and

    L_LS = T^2 * 1/|V| * sum_{i in V} KL( softmax(Z(z^T_i; T)) || softmax(Z(z^S_i; T)) )

with L = L_SS (Eq. 1 of SDES) + aux_weight * CE(aux) + ls_weight * L_LS.

Reference code: sunshangquan/logit-standardization-KD `mdistiller/distillers/KD.py` (`normalize`, `kd_loss`),
a classification codebase: its logits are N x K and `normalize` standardises along the last axis. Calling
it on a 4-D segmentation map (B x C x H x W) as it is standardises along W, the image width, not along
the classes, while its softmax runs over dim 1: that naive use is not what the paper describes and is
not reproduced. tests/conformance/kl-ls.json holds the reference's output on per-pixel rows (the correct
use), and its naive 4-D value, which the tests show to differ.

Choices (paper, code and this file; docs/methods-frontier.md lists them):
- Standard deviation: the code's `torch.std` (Bessel-corrected, divisor C - 1) plus 1e-7 added to it
  (`ls_std=unbiased`, `ls_eps=1e-7`). Algorithm 1 writes the population deviation (divisor C) with no
  epsilon: `ls_std=population ls_eps=0` (it scales every Z by sqrt(C / (C - 1)), i.e. a slightly lower
  effective temperature).
- Weight and temperature: T = 2, ls_weight = 9, the defaults of the repository's `tools/train.py`
  (`--base-temp 2 --kd-weight 9`, the README's commands for CIFAR-100 and ImageNet). Its CIFAR-100 runs also
  scale the CE by 0.1 (the config's CE_WEIGHT); the ImageNet config keeps 1.0, as here.
- Reduction: sum over classes, mean over the labelled pixels V (the suite's convention); the code's mean
  over samples is `ls_valid_only=false` (mean over all B*H*W pixels).
- Resolution: on the logits at input size (the suite's output contract).
- The teacher's logits are a detached target; both sides are standardised in fp32 (full_precision).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from sdesbench.config import rng
from sdesbench.methods.base import METHODS
from sdesbench.methods.losses import fp32, full_precision, hinton_kd_loss, valid_mask
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions

StdKind = Literal["unbiased", "population"]  # the code's torch.std (divisor C - 1) | Algorithm 1's (divisor C)


def zscore_over_classes(logits: torch.Tensor, std: StdKind = "unbiased", eps: float = 1e-7) -> torch.Tensor:
    """Alg. 1's Z-score of each pixel's class logits (dim 1 of B x C x H x W, or of N x C rows):
    (z - mean_c z) / (eps + std_c z). The temperature is applied by the caller, as in the code."""
    mean = logits.mean(dim=1, keepdim=True)
    deviation = logits.std(dim=1, keepdim=True, unbiased=std == "unbiased")
    return (logits - mean) / (eps + deviation)


def logit_standardized_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                               valid: torch.Tensor | None = None, std: StdKind = "unbiased",
                               eps: float = 1e-7) -> torch.Tensor:
    """L_LS: T^2 * mean over pixels (the `valid` ones, if given) of KL(softmax(Z(z^T)/T) || softmax(Z(z^S)/T)),
    the Z-score taken over the classes of each pixel (Alg. 1 with every pixel a sample)."""
    with full_precision():
        s, t = fp32(student_logits, teacher_logits.detach())
        return hinton_kd_loss(zscore_over_classes(s, std, eps), zscore_over_classes(t, std, eps), temperature, valid)


@METHODS.register("kl-ls")
class KLLogitStandardization(TeacherStudentMethod):
    """L = L_SS (Eq. 1) + ls_weight * T^2 * mean_pixels KL(q^T || q^S) on Z-scored logits (Sun et al. 2024,
    Alg. 1, per pixel over the classes); see the module docstring."""

    logged_terms = ("ss", "kd_ls")
    conformance = "kl-ls.json"
    option_prefix = "ls_"

    @dataclass
    class Options(TeacherStudentOptions):
        ls_weight: float = field(default=9.0, metadata=rng(0.0, doc="weight of the KD term "
                                                                    "(tools/train.py --kd-weight 9)"))
        ls_temperature: float = field(default=2.0, metadata=rng(1e-3, doc="base temperature T (--base-temp 2); "
                                                                          "loss scaled by T^2"))
        ls_valid_only: bool = True  # mean over labelled pixels (false: over all pixels, the code's mean over samples)
        ls_std: StdKind = "unbiased"
        ls_eps: float = field(default=1e-7, metadata=rng(0.0, doc="added to the standard deviation (the code's 1e-7)"))

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        terms = self.task_terms(student_out, labels)
        o = self.opts
        valid = valid_mask(labels) if o.ls_valid_only else None
        terms["kd_ls"] = o.ls_weight * logit_standardized_kd_loss(student_out["logits"], teacher_out["logits"],
                                                                 o.ls_temperature, valid, o.ls_std, o.ls_eps)
        return terms
