"""`kl`: pixel-wise knowledge distillation (Hinton, Vinyals & Dean 2015), the paper's "KL*" rows.

L = L_SS (Eq. 1) + kd_weight * L_KD with, per pixel i over the C classes,

    L_KD = T^2 * 1/|V| * sum_{i in V} sum_c p^T_ic * (log p^T_ic - log p^S_ic),
    p^T_i = softmax(z^T_i / T),  p^S_i = softmax(z^S_i / T)

i.e. KL(teacher || student) on temperature-softened class distributions (Hinton 2015, Sec. 2:
the soft-target term, scaled by T^2 so its gradients keep their magnitude as T changes).

Choices (public codebases disagree; this is what is computed):
- Reduction: sum over classes, **mean over the labelled pixels V** (labels != 255), the suite's
  convention. CIRKD/RDD's `CriterionKD` uses `kl_div(reduction="batchmean")` over all B*h*w
  pixels (ignored ones included); `kd_valid_only=false` gives that mean over all pixels. The
  other common choice, `reduction="mean"` over all B*C*H*W elements, is C times smaller; it is
  not offered (it only rescales `kd_weight`).
- Resolution: on the logits at input size (the suite's output contract); CIRKD distils the
  1/8-resolution logits, which the upsampled ones interpolate.
- Defaults T = 1, kd_weight = 1 as in CIRKD's and RDD's KD scripts (`--kd-temperature 1`,
  `--lambda-kd 1`); Hinton's classification experiments use larger T (try `kd_temperature=4`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdesbench.config import rng
from sdesbench.methods.losses import hinton_kd_loss, valid_mask
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions
from sdesbench.methods.base import METHODS


@dataclass
class KLOptions:
    kd_weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of the KD term"))
    kd_temperature: float = field(default=1.0, metadata=rng(1e-3, doc="softmax temperature T (loss scaled by T^2)"))
    kd_valid_only: bool = True  # average over labelled pixels (false: over all pixels, as CIRKD's batchmean)


def kd_term(opts: KLOptions, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
    valid = valid_mask(labels) if opts.kd_valid_only else None
    return opts.kd_weight * hinton_kd_loss(student_logits, teacher_logits, opts.kd_temperature, valid)


@METHODS.register("kl")
class KL(TeacherStudentMethod):
    """L = L_SS (Eq. 1) + kd_weight * T^2 * mean_pixels KL(p^T || p^S) (Hinton 2015); see the module docstring."""
    logged_terms = ("ss", "kd")
    conformance = "kl.json"
    option_prefix = "kd_"

    @dataclass
    class Options(KLOptions, TeacherStudentOptions):
        pass

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        terms = self.task_terms(student_out, labels)
        terms["kd"] = kd_term(self.opts, student_out["logits"], teacher_out["logits"], labels)
        return terms
