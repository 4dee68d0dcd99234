"""`kt`: Knowledge Tailoring (Cheung, Woo, Kim & Hwang, "Knowledge Tailoring: Bridging the Teacher-Student Gap
in Semantic Segmentation", Pattern Recognition 172, 112399, 2025), the KT row of the `frontier` table.

KT reshapes what the teacher offers before the student imitates it: the teacher's feature is re-mixed by
its channel correlation with the student's (feature tailoring, FT), and its logits are sharpened inside and
outside each class's labelled region (logit tailoring, LT). The paper's PDF was not available while this
was written: the equations below are what the reference code computes, named after the paper's parts.

Notation: F_S (B x C_S x h x w), F_T (B x C_T x h x w) the features before the classifiers; z^S, z^T
(B x K x H x W) the logits at the labels' size; CW(a, b) the channel-wise distillation loss of `cwd`
(Shu et al. 2021 Eq. 3: per channel, KL between softmaxes over the positions at temperature tau, summed
over positions, tau^2 / (B x C)), with b the target.

Correlation re-mixing (per image, one channel = one h*w vector): with the channels of a "guide" map G and a
"source" map X L2-normalised over positions, R = norm(G) norm(X)^T (C_G x C_X) and

    high(X | G) = R X,    low(X | G) = (1 - R) X          (both C_G x h x w)

Feature tailoring, in two phases split at iteration `kt_tuning_point` (1-based, as train_KT.py counts):
- phase 1 (student tailored toward the teacher): A = phi_S(high(F_S | F_T)), N = phi_S(low(F_S | F_T)),
      L_FT = CW(A, F_T),   L_tri = Triplet(conv(F_S), A, N)
- phase 2 (teacher tailored toward the student): A = phi_T(high(F_T | F_S)), N = phi_T(low(F_T | F_S)),
      L_FT = CW(F_S, A),   L_tri = Triplet(F_S, A, N)
phi_S (C_T -> C_T/2 -> C_T/2 -> C_T) and phi_T (C_S -> C_S/2 -> C_S/2 -> C_S) are three 1x1 convolutions
with ReLUs between (`Tailoring`), conv a 1x1 convolution C_S -> C_T without bias; Triplet(a, p, n) =
mean(max(0, m + d(a, p) - d(a, n))) with d the Euclidean distance along `kt_triplet_axis`.

Logit tailoring: with M_k the mask of the pixels labelled k (none for ignored pixels), per image and class
k, m+_k the mean of the logits z_k > 0 inside M_k and m-_k the mean of z_k (1 - M_k) over all H*W pixels:

    class part     C(z)_k = M_k * max(z_k, m+_k)         (z_k itself where no z_k > 0 lies in M_k)
    non-class part O(z)_k = (1 - M_k) * min(z_k, m-_k)
    L_LT = CW(z^S, C(z^T) + O(z^T)) + CW(C(z^S), C(z^T)) + CW(O(z^S), O(z^T))

(the student's own means m+, m- carry its gradient, as in the code). And the logit KD of the code
(losses/kd.py's `CriterionKD`, which is channel-wise KD, not CIRKD's pixel-wise class of the same name):

    L_KD = CW(z^S, z^T) + aux_weight * kd_weight * CW(z^S_aux, z^T_aux)

    L = L_SS (Eq. 1) + aux_weight CE(aux) + kd_weight L_KD + lt_weight L_LT + ft_weight L_FT + triplet_weight L_tri

with every weight 1 and tau = 4 (train_KT.sh, the argparse default of --kd-temperature).

Reference code: seok-hwa/KT at 709743f0a769f206ef0652e3c5b703340d19f79c, `train_KT.py` (the loss block of
`Trainer.train`), `losses/KT.py` (`CriterionKT` with norm_type='channel', divergence='kl': the CW above),
`losses/kd.py`, `models/tailoring.py`; tests/conformance/kt.json holds what that code returned.

Choices and differences from the reference code (each with its option where there is a choice):
- Tailoring modules are not trained (default, `kt_train_tailoring=false`): train_KT.py builds phi_S, phi_T
  and conv but never gives them to its optimizer (it holds the student only), so they keep their random
  initialisation for the whole run; here they are frozen (requires_grad false) and saved in the checkpoint.
  `kt_train_tailoring=true` trains them with the student, in their own parameter group at
  `kt_tailoring_lr_mult` x the base learning rate.
- Phase switch: at 1-based iteration 10,000 (`kt_tuning_point`, absolute, the reference's
  --tuning-point of a 40,000-iteration run); i.e. the 0-based iteration 9,999 is the first of phase 2.
  `kt_tuning_scale=relative` moves it to kt_tuning_point / 40,000 of this run's iterations (a quarter by
  default), for schedules shorter or longer than the reference's; absolute runs shorter than 10,000
  iterations never reach phase 2.
- Triplet distance axis: `nn.TripletMarginLoss` on B x C x h x w maps measures distances along the last
  axis (the width), giving B x C x h distances: `kt_triplet_axis=width` (default) reproduces it;
  `channel` measures per pixel across channels (B x h x w distances), the reading of a feature triplet.
- Logits: the model contract gives logits at input size (bilinear from 1/8); the reference tailors its 1/8
  logits upsampled by nearest neighbour to the crop, and its KD reads the 1/8 logits. With nearest-upsampled
  logits the numbers are the reference's (a channel-wise KL is unchanged by repeating every position);
  with the bilinear ones they differ slightly.
- Ignored pixels (255; the reference's -1) belong to no class: they are in every class's non-class part.
- The KD on the aux logits is weighted aux_weight x kd_weight x kd_weight, as written in train_KT.py
  (`lambda_kd * (kd + 0.4 * lambda_kd * kd_aux)`; the same with the script's lambda_kd = 1); it needs aux
  heads on both networks.
- Sizes: a student feature of another spatial size is resized (bilinear) to the teacher's (the reference
  requires equal sizes). The tailoring widths are C/2 of the tailored map (the reference hard-codes 256/128
  and 128/64 for its R101 -> R18 pair, the same thing).
- log(softmax) where the reference writes softmax().log(): the same in float32 unless a probability
  underflows, where the reference gives -inf x 0 = NaN.
- Precision: the correlation, softmaxes and distances are computed in float32 (`full_precision`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sdesbench import IGNORE_INDEX
from sdesbench.config import rng
from sdesbench.methods.base import METHODS, MethodContext, StepInfo
from sdesbench.methods.cwd import cwd_loss
from sdesbench.methods.features import feature_map, student_and_teacher_channels
from sdesbench.methods.losses import fp32, full_precision
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions
from sdesbench.models.base import to_size

KtFeature = Literal["decoder_feature", "last_stage"]
TripletAxis = Literal["width", "channel"]  # nn.TripletMarginLoss on 4-D maps (the reference) | per pixel
TuningScale = Literal["absolute", "relative"]  # the iteration as given | a fraction of the reference's 40,000
REFERENCE_ITERS = 40000  # train_KT.sh's --max-iterations


# ----------------------------------------------------------------------------- the losses


def class_masks(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x H x W labels -> B x K x H x W float masks M_k (ignored pixels belong to no class)."""
    valid = labels != IGNORE_INDEX
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2)
    return (onehot * valid.unsqueeze(1)).float()


def logit_tailoring(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KT's logit tailoring (module docstring): the class part M_k max(z_k, m+_k) and the non-class part
    (1 - M_k) min(z_k, m-_k) of B x K x H x W logits, with the per-image, per-class means m+, m- (not
    detached: they carry the gradient, as in train_KT.py's loop)."""
    inside = logits * masks
    positive = (inside > 0).float()
    count = positive.sum((2, 3), keepdim=True)
    mean_pos = (inside * positive).sum((2, 3), keepdim=True) / count.clamp(min=1)
    lift = (inside < mean_pos) & (count > 0)  # the reference's mean is NaN without positive logits: no change
    class_part = torch.where(lift, mean_pos.expand_as(inside), inside) * masks
    outside = logits * (1 - masks)
    mean_out = outside.mean((2, 3), keepdim=True)
    non_class_part = torch.where(outside > mean_out, mean_out.expand_as(outside), outside) * (1 - masks)
    return class_part, non_class_part


def logit_tailoring_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                         tau: float) -> torch.Tensor:
    """L_LT = CW(z^S, C(z^T) + O(z^T)) + CW(C(z^S), C(z^T)) + CW(O(z^S), O(z^T)) (module docstring)."""
    with full_precision():
        s, t = fp32(student_logits, teacher_logits.detach())
        masks = class_masks(labels, s.shape[1])
        s_class, s_other = logit_tailoring(s, masks)
        t_class, t_other = logit_tailoring(t, masks)
        return (cwd_loss(s, t_class + t_other, tau) + cwd_loss(s_class, t_class, tau)
                + cwd_loss(s_other, t_other, tau))


def correlation_remix(source: torch.Tensor, guide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """high(X | G) = R X and low(X | G) = (1 - R) X with R = norm(G) norm(X)^T over channels normalised along
    the positions (per image): B x C_X x h x w source, B x C_G x h x w guide -> two B x C_G x h x w maps."""
    b, c_g, h, w = guide.shape
    x = source.flatten(2)
    r = torch.bmm(F.normalize(guide.flatten(2), dim=2), F.normalize(x, dim=2).transpose(1, 2))
    return torch.bmm(r, x).view(b, c_g, h, w), torch.bmm(1 - r, x).view(b, c_g, h, w)


def tailoring_triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float,
                           axis: TripletAxis) -> torch.Tensor:
    """mean(max(0, margin + d(a, p) - d(a, n))), d the Euclidean distance along the width (`nn.
    TripletMarginLoss` on B x C x h x w, the reference, eps 1e-7) or across channels per pixel."""
    if axis == "channel":
        anchor, positive, negative = (x.permute(0, 2, 3, 1) for x in (anchor, positive, negative))
    return F.triplet_margin_loss(anchor, positive, negative, margin=margin, p=2, eps=1e-7)


class Tailoring(nn.Sequential):
    """KT's tailoring module phi: 1x1 conv C -> C/2, ReLU, 1x1 conv C/2 -> C/2, ReLU, 1x1 conv C/2 -> C
    (with biases; models/tailoring.py)."""

    def __init__(self, channels: int):
        latent = max(channels // 2, 1)
        super().__init__(nn.Conv2d(channels, latent, 1), nn.ReLU(), nn.Conv2d(latent, latent, 1), nn.ReLU(),
                         nn.Conv2d(latent, channels, 1))


# ----------------------------------------------------------------------------- the method


@METHODS.register("kt")
class KT(TeacherStudentMethod):
    """L = L_SS (Eq. 1) + L_KD + L_LT + L_FT + L_tri (Cheung et al. 2025, as train_KT.py); module docstring."""
    logged_terms = ("ss", "kd", "lt", "ft", "triplet")  # + aux, kd_aux with aux heads
    conformance = "kt.json"
    option_prefix = "kt_"

    @dataclass
    class Options(TeacherStudentOptions):
        kt_kd_weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of the channel-wise logit KD (--lambda-kd)"))
        kt_lt_weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of logit tailoring (--lambda-mask)"))
        kt_ft_weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of feature tailoring (--lambda-custom)"))
        kt_triplet_weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of the triplet term (--lambda-contrastive)"))
        kt_tau: float = field(default=4.0, metadata=rng(1e-3, doc="temperature of every channel-wise KL (--kd-temperature)"))
        kt_triplet_margin: float = field(default=1.0, metadata=rng(0.0, doc="margin of the triplet term"))
        kt_triplet_axis: TripletAxis = "width"
        kt_tuning_point: int = field(default=10000, metadata=rng(1, doc="1-based iteration where phase 2 starts (--tuning-point)"))
        kt_tuning_scale: TuningScale = "absolute"
        kt_train_tailoring: bool = False
        kt_tailoring_lr_mult: float = field(default=1.0, metadata=rng(0.0, doc="lr of the tailoring modules / base lr (with kt_train_tailoring)"))
        kt_on: KtFeature = "decoder_feature"

    def __init__(self, options, ctx: MethodContext):
        super().__init__(options, ctx)
        s_ch, t_ch = student_and_teacher_channels(ctx, options.kt_on)
        self.student_tailoring = Tailoring(t_ch)  # phi_S: phase 1, on high/low(F_S | F_T) (C_T channels)
        self.teacher_tailoring = Tailoring(s_ch)  # phi_T: phase 2, on high/low(F_T | F_S) (C_S channels)
        self.anchor_conv = nn.Conv2d(s_ch, t_ch, 1, bias=False)  # the phase-1 triplet anchor's conv
        if not options.kt_train_tailoring:  # the reference never optimises them (module docstring)
            for p in self.tailoring_parameters():
                p.requires_grad_(False)
        point = options.kt_tuning_point
        if options.kt_tuning_scale == "relative":
            point = max(1, round(point / REFERENCE_ITERS * ctx.total_iters))
        self.tuning_point = point

    def tailoring_parameters(self) -> list[nn.Parameter]:
        return [*self.student_tailoring.parameters(), *self.teacher_tailoring.parameters(),
                *self.anchor_conv.parameters()]

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        if not self.opts.kt_train_tailoring:
            return []
        return [{"params": self.tailoring_parameters(), "lr": self.opts.kt_tailoring_lr_mult * base_lr}]

    def feature_terms(self, s: torch.Tensor, t: torch.Tensor, step: StepInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_FT, L_tri) of the phase `step` is in (module docstring)."""
        o = self.opts
        with full_precision():
            s, t = fp32(s, t.detach())
            if step.iteration + 1 < self.tuning_point:  # phase 1: the student's feature tailored
                high, low = correlation_remix(s, t)
                positive, negative = self.student_tailoring(high), self.student_tailoring(low)
                ft = cwd_loss(positive, t, o.kt_tau)
                anchor = self.anchor_conv(s)
            else:  # phase 2: the teacher's feature tailored toward the student's
                high, low = correlation_remix(t, s)
                positive, negative = self.teacher_tailoring(high), self.teacher_tailoring(low)
                ft = cwd_loss(s, positive, o.kt_tau)
                anchor = s
            return ft, tailoring_triplet_loss(anchor, positive, negative, o.kt_triplet_margin, o.kt_triplet_axis)

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        o = self.opts
        terms = self.task_terms(student_out, labels)
        size = labels.shape[-2:]
        z_s, z_t = to_size(student_out["logits"], size), to_size(teacher_out["logits"], size)
        with full_precision():
            terms["kd"] = o.kt_kd_weight * cwd_loss(fp32(z_s), z_t, o.kt_tau)
            if student_out.get("aux") is not None and teacher_out.get("aux") is not None:
                terms["kd_aux"] = o.kt_kd_weight * o.aux_weight * o.kt_kd_weight * cwd_loss(
                    fp32(student_out["aux"]), teacher_out["aux"], o.kt_tau)
        terms["lt"] = o.kt_lt_weight * logit_tailoring_loss(z_s, z_t, labels, o.kt_tau)
        t = feature_map(teacher_out, o.kt_on)
        s = to_size(feature_map(student_out, o.kt_on), t.shape[-2:])
        ft, triplet = self.feature_terms(s, t, step)
        terms["ft"] = o.kt_ft_weight * ft
        terms["triplet"] = o.kt_triplet_weight * triplet
        return terms
