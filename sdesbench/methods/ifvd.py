"""`ifvd`: intra-class feature variation distillation (Wang et al., "Intra-class Feature Variation
Distillation for Semantic Segmentation", ECCV 2020), the pure loss; `ifvd+kd+adv`: the IFVD row of CIRKD's
table (this loss + pixel KD + the holistic adversarial term, as CIRKD runs it).

For a feature map f (B x D x h x w) and the labels y at its size, the prototype of class k in image b
is the mean feature of its pixels (Wang et al. Sec. 3, the class prototype), and the IFV map holds, per
pixel, the cosine similarity between the pixel's feature and its class prototype:

    c_bk = 1/|S_bk| sum_{p in S_bk} f_bp,   S_bk = {p : y_bp = k}
    M_bp = cos(f_bp, c_{b, y_bp})

The student learns the teacher's map (the paper's IFV loss, a mean squared error):

    L_IFV = 1/|P| sum_{(b,p) in P} (M^S_bp - M^T_bp)^2

and L = L_SS (Eq. 1 of SDES) + aux_weight * CE(aux) + ifvd_weight * L_IFV.

Reference code: winycg/CIRKD `losses/ifvd.py` (`CriterionIFV`), the same function as the authors'
YukangWang/IFVD `utils/criterion.py`; CIRKD's `train_kd.py` calls it on `s_outputs[-1]`/`t_outputs[-1]`
(the feature before the classifier) with the labels. tests/conformance/ifvd.json holds its output.

Choices (what is computed and the alternative):
- Labels: nearest-neighbour resized to each feature's size (both codes: `nn.Upsample(mode='nearest')`).
  A pixel whose label is ignored (255) belongs to no class: both codes keep its own feature as its
  "prototype", so both maps are 1 there and the pixel adds 0.
- Reduction, i.e. the set P: the labelled positions at the teacher feature's size (`ifvd_valid_only=true`,
  the suite's convention). Both public codes take `MSELoss` over all B*h*w positions, the ignored ones
  (which add 0) included, i.e. the same sum divided by more positions: `ifvd_valid_only=false`.
- Features: the feature before the classifier (`ifvd_on=decoder_feature`: CIRKD's `x_feat_after_aspp`,
  IFVD's `x_feat_after_psp`); `ifvd_on=last_stage` uses the last encoder stage. Channel counts of student
  and teacher need not match (the map is one cosine per pixel; no adapter).
- Sizes: each map is computed at its own feature's size; when they differ, the student's map is resized
  (bilinear) to the teacher's.
- Gradients: the student's prototypes are means of its own features and are not detached (as both
  codes); the teacher's map is a detached target.
- Prototype mean: both codes divide by (count + 1e-6); the cosine does not depend on the prototype's
  length, so the exact mean is used.
- Weight: ifvd_weight = 20, CIRKD's `--lambda-ifv 20` (scripts/train_kd/train_ifvd.sh); the authors'
  options.py uses `--lambda-ifv 200` (`ifvd_weight=200`). Both scripts also add pixel KD and an
  adversarial term (IFVD's full objective): that is the composite `ifvd+kd+adv` (CIRKD's IFVD row,
  `--lambda-kd 1 --lambda-adv 0.001 --lambda-d 0.1`; the terms of `kl` and `adversarial.py`), registered
  here beside this pure method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from sdesbench.config import rng
from sdesbench.methods.adversarial import AdversarialOptions, KDAdversarialMethod
from sdesbench.methods.base import METHODS
from sdesbench.methods.features import feature_map
from sdesbench.methods.kl import KLOptions
from sdesbench.methods.losses import fp32, full_precision, labels_at, valid_mask
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions
from sdesbench.models.base import to_size

IfvdFeature = Literal["decoder_feature", "last_stage"]


def class_prototype_map(feature: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Wang et al.'s class prototypes spread back to the pixels: B x D x h x w -> each pixel's class
    prototype c_{b,y_bp} (the mean feature of its class in its image); a pixel of no class (ignored)
    keeps its own feature. `labels` are B x h x w, at the feature's size."""
    b, d, h, w = feature.shape
    flat = feature.flatten(2)  # B x D x N
    lab = labels.flatten(1)  # B x N
    in_class = (lab >= 0) & (lab < num_classes)
    onehot = F.one_hot(lab.clamp(0, num_classes - 1), num_classes).to(flat.dtype) * in_class.unsqueeze(-1)
    counts = onehot.sum(1).clamp(min=1.0)  # B x K (absent classes are never read back)
    prototypes = (flat @ onehot) / counts.unsqueeze(1)  # B x D x K
    per_pixel = prototypes @ onehot.transpose(1, 2)  # B x D x N
    return torch.where(in_class.unsqueeze(1), per_pixel, flat).view(b, d, h, w)


def ifv_map(feature: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Wang et al.'s IFV map: M_bp = cos(f_bp, c_{b,y_bp}), B x h x w (labels resized to the feature, nearest)."""
    labels = labels_at(labels, feature.shape[-2:])
    return F.cosine_similarity(feature, class_prototype_map(feature, labels, num_classes), dim=1)


def ifvd_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, labels: torch.Tensor,
              num_classes: int, valid_only: bool = True) -> torch.Tensor:
    """Wang et al.'s IFV loss: mean of (M^S - M^T)^2 over the labelled positions at the teacher feature's size
    (`valid_only`), or over all positions (CIRKD / IFVD `MSELoss`)."""
    with full_precision():
        s, t = fp32(student_feature, teacher_feature.detach())
        m_t = ifv_map(t, labels, num_classes)
        m_s = to_size(ifv_map(s, labels, num_classes).unsqueeze(1), m_t.shape[-2:]).squeeze(1)
        squared = (m_s - m_t).pow(2)
        if not valid_only:
            return squared.mean()
        valid = valid_mask(labels_at(labels, m_t.shape[-2:]))
        if not bool(valid.any()):
            return squared.sum() * 0.0
        return squared[valid].mean()


@dataclass
class IFVDOptions:
    ifvd_weight: float = field(default=20.0, metadata=rng(0.0, doc="weight of the IFV term (CIRKD: 20)"))
    ifvd_on: IfvdFeature = "decoder_feature"
    ifvd_valid_only: bool = True  # mean over labelled positions (false: over all, as CIRKD and IFVD)


def ifvd_term(opts: IFVDOptions, student_out: dict[str, Any], teacher_out: dict[str, Any], labels: torch.Tensor,
              num_classes: int) -> torch.Tensor:
    """ifvd_weight x L_IFV on the maps `ifvd_on` names; shared by `ifvd` and `ifvd+kd+adv`."""
    s, t = feature_map(student_out, opts.ifvd_on), feature_map(teacher_out, opts.ifvd_on)
    return opts.ifvd_weight * ifvd_loss(s, t, labels, num_classes, opts.ifvd_valid_only)


@METHODS.register("ifvd")
class IFVD(TeacherStudentMethod):
    """L = L_SS (Eq. 1) + ifvd_weight * mean (M^S - M^T)^2 (Wang et al. 2020, IFV loss); module docstring."""
    logged_terms = ("ss", "ifvd")
    conformance = "ifvd.json"
    option_prefix = "ifvd_"

    @dataclass
    class Options(IFVDOptions, TeacherStudentOptions):
        pass

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        terms = self.task_terms(student_out, labels)
        terms["ifvd"] = ifvd_term(self.opts, student_out, teacher_out, labels, self.num_classes)
        return terms


@METHODS.register("ifvd+kd+adv")
class IFVDKDAdv(KDAdversarialMethod):
    """CIRKD's IFVD row: L_SS + aux + ifvd (20) + pixel KD (`kd`, 1) + the holistic adversarial term (`adv`,
    0.001; the discriminator's own update `adv_d`, 0.1), as `scripts/train_kd/train_ifvd.sh` runs it."""
    logged_terms = ("ss", "ifvd", "kd", "adv", "adv_d")
    conformance = "skd.json"
    option_prefix = "ifvd_"

    @dataclass
    class Options(IFVDOptions, KLOptions, AdversarialOptions, TeacherStudentOptions):
        pass

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        terms = self.task_terms(student_out, labels)
        terms["ifvd"] = ifvd_term(self.opts, student_out, teacher_out, labels, self.num_classes)
        terms.update(self.kd_and_adversarial_terms(student_out, labels, teacher_out))
        return terms
