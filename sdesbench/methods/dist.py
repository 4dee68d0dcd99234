"""`dist`: distillation from a stronger teacher by relations (Huang et al., "Knowledge Distillation from
A Stronger Teacher", NeurIPS 2022), the DIST row of CIRKD-style tables.

Each pixel is an instance. With Y^S, Y^T the N x C matrices of class probabilities of the N pixels
(N = B*H*W), Y = softmax(Z / tau), and the Pearson distance d_p(u, v) = 1 - rho_p(u, v) (Huang et
al. Sec. 3, "relaxed match with relations"), DIST matches

    inter-class relation:  L_inter = 1/N sum_i d_p(Y^S_i,:, Y^T_i,:)      (per pixel, across classes)
    intra-class relation:  L_intra = 1/C sum_j d_p(Y^S_:,j, Y^T_:,j)      (per class, across pixels)
    L_DIST = beta * tau^2 * L_inter + gamma * tau^2 * L_intra

and L = L_SS (Eq. 1 of SDES) + aux_weight * CE(aux) + dist_weight * (L_DIST(logits)
+ dist_aux_weight * L_DIST(aux logits)).

Reference code: hunto/DIST_KD `segmentation/losses/dist_kd.py` (`DIST`, with rho_p as a cosine of
centred vectors, `+ 1e-8` in the denominator, computed the same way here). Its training script
`segmentation/train_kd.py` builds `DIST()` (beta = gamma = 1, no temperature: tau = 1), weighs it by
`--lambda-kd` (default 1; the scripts in `train_scripts/train_kd/` keep it) and, when the student has
an aux head (`args.aux`, set for ResNet students), adds `0.4 * lambda_kd * DIST(s_aux, t_aux)` on the
aux logits; its teacher is always built with `aux=True`. tests/conformance/dist.json holds the
function's and the script's outputs; the defaults here are that recipe.

Choices (what is computed and the alternative):
- Aux term: `dist_aux_weight` (0.4, the script's) times L_DIST between the student's and the teacher's
  aux logits, added as the term `dist_aux` whenever the student has an aux output (`model.aux=true`).
  The teacher must then have one too (train it with `model.aux=true`): a student with an aux head and
  a teacher without one stops with one line rather than distilling the aux head from something else.
  `dist_aux_weight=0` leaves the aux head to its CE only.
- Pixels: every pixel of the batch, as the public code, which sees no labels (`dist_valid_only=false`,
  default: the exact recipe). `dist_valid_only=true` keeps the labelled pixels only (the suite's
  convention elsewhere): crop padding and void pixels then enter neither relation.
- Resolution: the public code distils the logits at the decoder's 1/8 resolution; the suite's logits are
  at input size (the model contract), where this computes by default (`dist_size=input`). The per-pixel
  mean L_inter is an average of the same quantity either way; L_intra's correlations over pixels see
  the bilinearly interpolated maps. `dist_size=feature` resizes the logits (bilinear) to the student's
  `decoder_feature` grid first (1/8 for DeepLabV3), which approximates the public code's maps.
- Temperature: tau = 1 (the segmentation recipe); the paper's tau^2 factor is applied for any tau.
- The teacher's probabilities are a detached target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from sdesbench.config import rng
from sdesbench.errors import SdesbenchError
from sdesbench.methods.base import METHODS
from sdesbench.methods.losses import fp32, full_precision, labels_at, valid_mask
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions
from sdesbench.models.base import to_size

DistSize = Literal["input", "feature"]  # logits at input size | resized to the student's decoder_feature grid
PEARSON_EPS = 1e-8  # added to the product of norms (public code)


def pearson_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """d_p = 1 - rho_p per row of two R x K matrices (Huang et al. 2022, Pearson distance): 1 - cos of the
    centred rows, with the public code's 1e-8 in the denominator (hunto/DIST_KD dist_kd.py)."""
    u = u - u.mean(1, keepdim=True)
    v = v - v.mean(1, keepdim=True)
    rho = (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1) + PEARSON_EPS)
    return 1.0 - rho


def inter_class_relation(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """L_inter: mean over the N instances (rows of N x C probabilities) of d_p across classes."""
    return pearson_distance(p_s, p_t).mean()


def intra_class_relation(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """L_intra: mean over the C classes of d_p across the N instances (columns of N x C probabilities)."""
    return pearson_distance(p_s.t(), p_t.t()).mean()


def pixel_probabilities(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """B x C x H x W logits -> (B*H*W) x C probabilities softmax(z / tau), rows in (b, h, w) order."""
    return F.softmax(logits / tau, dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              tau: float = 1.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_DIST = tau^2 (beta L_inter + gamma L_intra) over the pixels (the `valid` ones, B x H x W, if given)."""
    with full_precision():
        s, t = fp32(student_logits, teacher_logits.detach())
        p_s, p_t = pixel_probabilities(s, tau), pixel_probabilities(t, tau)
        if valid is not None:
            if not bool(valid.any()):
                return p_s.sum() * 0.0
            keep = valid.flatten()
            p_s, p_t = p_s[keep], p_t[keep]
        return tau ** 2 * (beta * inter_class_relation(p_s, p_t) + gamma * intra_class_relation(p_s, p_t))


@METHODS.register("dist")
class DIST(TeacherStudentMethod):
    """L = L_SS (Eq. 1) + dist_weight * (L_DIST(logits) + dist_aux_weight * L_DIST(aux)); module docstring."""
    logged_terms = ("ss", "dist")
    conformance = "dist.json"
    option_prefix = "dist_"

    @dataclass
    class Options(TeacherStudentOptions):
        dist_weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of the DIST terms (lambda_kd)"))
        dist_beta: float = field(default=1.0, metadata=rng(0.0, doc="weight of the inter-class relation"))
        dist_gamma: float = field(default=1.0, metadata=rng(0.0, doc="weight of the intra-class relation"))
        dist_tau: float = field(default=1.0, metadata=rng(1e-3, doc="softmax temperature (loss times tau^2)"))
        dist_aux_weight: float = field(default=0.4, metadata=rng(0.0, doc="DIST on the aux logits (public: 0.4)"))
        dist_valid_only: bool = False  # all pixels, as the public code (true: labelled pixels only)
        dist_size: DistSize = "input"

    def _term(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, size) -> torch.Tensor:
        o = self.opts
        student, teacher = to_size(student, size), to_size(teacher, size)
        valid = valid_mask(labels_at(labels, size)) if o.dist_valid_only else None
        return o.dist_weight * dist_loss(student, teacher, o.dist_beta, o.dist_gamma, o.dist_tau, valid)

    def loss_terms(self, student_out: dict[str, Any], labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        terms = self.task_terms(student_out, labels)
        grid = student_out["decoder_feature"] if self.opts.dist_size == "feature" else student_out["logits"]
        size = grid.shape[-2:]
        terms["dist"] = self._term(student_out["logits"], teacher_out["logits"], labels, size)
        if student_out.get("aux") is not None and self.opts.dist_aux_weight > 0:
            if teacher_out.get("aux") is None:
                raise SdesbenchError("method 'dist': the student has an aux head but the teacher has none (train "
                                     "the teacher with model.aux=true, or set method.dist_aux_weight=0)")
            terms["dist_aux"] = self.opts.dist_aux_weight * self._term(student_out["aux"], teacher_out["aux"],
                                                                       labels, size)
        return terms
