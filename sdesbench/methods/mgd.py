"""`mgd`: masked generative distillation (Yang et al., "Masked Generative Distillation", ECCV 2022), with
the logit term of its segmentation distiller.

The student's feature S (aligned to the teacher's channels by f_align) is masked at random positions and a
small generative block G must produce the teacher's *whole* feature T from what is left (MGD Sec. 3.2):

    M_ij = 0 if R_ij > 1 - lambda else 1,   R_ij ~ U(0, 1)                           (Eq. 1; code's rule)
    G(F) = W_l2(ReLU(W_l1(F)))            (two 3x3 convolutions)                       (Eq. 2)
    L_dis = 1/B * sum_{b,k,i,j} (T_bkij - G(f_align(S_b) . M_b)_kij)^2                 (Eq. 3)
    L = L_SS (Eq. 1 of SDES) + aux_weight * CE(aux) + mgd_alpha * L_dis                 (Eq. 4)
        + mgd_logit_weight * L_logit

where L_logit is the logit term the reference's `SegmentationDistiller` adds (`use_logit=True`): channel-wise
distillation of the logits, tau^2/(B*C) * sum_{b,c} KL(softmax_HW(z^T_bc/tau) || softmax_HW(z^S_bc/tau)),
tau = 4, weight 3 (`cwd_loss`, Shu et al. 2021 Eq. 3).

Reference code: yzd-v/MGD `seg/mmseg/distillation/losses/mgd.py` (`FeatureLoss`) and
`seg/mmseg/distillation/distillers/segmentation_distiller.py`, with the config
`seg/configs/distillers/mgd/psp_r101_distill_deepv3_r18_40k_512x512_city.py`. tests/conformance/mgd.json
holds their outputs; the project's loss reproduces them with the reference's mask replayed through `keep`.

Choices (docs/methods-frontier.md lists every difference):
- Which feature: the last encoder stage of both networks (`mgd_on=last_stage`), as the seg config
  (`student_feat[-1]`, `fea_t[-1]`: 512 -> 2048 channels for ResNet-18 -> ResNet-101).
- Alignment: a 1x1 convolution with bias, only when the channel counts differ, as `FeatureLoss` builds it
  (no BN); trained with the student, dropped at deployment, like G.
- Mask: Eq. 1 of the paper zeroes R < lambda; the code zeroes R > 1 - lambda (the same distribution). The code's
  rule is used, so the same uniform draws give the reference's mask. One mask per position, shared by all
  channels, drawn from the method's own generator (`self.generator`: the same after a resume, different per
  DDP rank), not from torch's global one as the reference does.
- Reduction: a sum over all elements divided by the batch size (the code; Eq. 3 sums without the 1/B), with
  alpha = 2e-5 (the seg config's `alpha_mgd`): the term grows with the feature map's size.
- Sizes: when the stages' resolutions differ (a transformer and a CNN), the aligned student map is resized
  (bilinear) to the teacher's; the reference asserts they are equal.
- Logit term: on the logits at input size (the suite's output contract); the reference uses the decode
  head's 1/8-resolution logits (tau^2/(B*C) does not depend on the number of positions).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sdesbench.config import rng
from sdesbench.errors import ConfigError
from sdesbench.methods.base import METHODS, MethodContext
from sdesbench.methods.cwd import cwd_loss
from sdesbench.methods.features import FeatureMap, feature_map, student_and_teacher_channels
from sdesbench.methods.losses import fp32, full_precision
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions
from sdesbench.models.base import to_size


def random_keep_mask(uniform: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """Eq. 1 with the code's rule: 1 (kept) where the uniform draw is <= 1 - ratio, 0 (masked) where it is above."""
    return (uniform <= 1 - mask_ratio).to(uniform.dtype)


def masked_generation_loss(generated: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 3 as the code reduces it: sum over all elements of (T - G(.))^2, divided by the batch size."""
    return (generated.float() - teacher.detach().float()).pow(2).sum() / teacher.shape[0]


class AlignedGenerator(nn.Module):
    """f_align (1x1 conv with bias, when the channel counts differ) followed by Eq. 2's generative block G on
    the masked map: student feature + keep mask (B x 1 x h x w, at the teacher's size) -> generated T."""

    def __init__(self, student_channels: int, teacher_channels: int, generator: nn.Module | None = None):
        super().__init__()
        self.align = (nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
                      if student_channels != teacher_channels else None)
        self.generation = generator or nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1))

    def aligned(self, student: torch.Tensor, size) -> torch.Tensor:
        if self.align is not None:
            student = self.align(student)
        return to_size(student, size)

    def forward(self, student: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        aligned = self.aligned(student, keep.shape[-2:])
        return self.generation(aligned * keep.to(aligned.dtype))


def mgd_loss(generator: AlignedGenerator, student: torch.Tensor, teacher: torch.Tensor,
             keep: torch.Tensor) -> torch.Tensor:
    """L_dis (Eq. 3) of the student map through f_align, the mask `keep` and G, against the teacher map."""
    return masked_generation_loss(generator(student, keep), teacher)


def mgd_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """The reference distiller's logit term: CWD on the logits (Shu et al. 2021 Eq. 3), tau^2/(B*C) * sum KL."""
    with full_precision():
        return cwd_loss(*fp32(student_logits, teacher_logits), tau)


@METHODS.register("mgd")
class MGD(TeacherStudentMethod):
    """L = L_SS (Eq. 1) + mgd_alpha * L_dis (MGD Eq. 3-4) + mgd_logit_weight * CWD on the logits (the reference's
    seg distiller); see the module docstring."""

    logged_terms = ("ss", "mgd", "mgd_logit")
    conformance = "mgd.json"
    option_prefix = "mgd_"

    @dataclass
    class Options(TeacherStudentOptions):
        mgd_alpha: float = field(default=2e-5, metadata=rng(0.0, doc="alpha of Eq. 4 (alpha_mgd of the seg config)"))
        mgd_lambda: float = field(default=0.75, metadata=rng(0.0, 1.0, doc="masked ratio lambda (lambda_mgd)"))
        mgd_on: FeatureMap = "last_stage"
        mgd_logit_weight: float = field(default=3.0, metadata=rng(0.0, doc="weight of the logit term (0: off, "
                                                                           "the distiller's use_logit=False)"))
        mgd_logit_tau: float = field(default=4.0, metadata=rng(1e-3, doc="temperature of the logit term"))

    def __init__(self, options, ctx: MethodContext):
        super().__init__(options, ctx)
        if options.mgd_on == "logits":
            raise ConfigError("method.mgd_on: MGD distils a feature map (last_stage or decoder_feature), not logits")
        s_ch, t_ch = student_and_teacher_channels(ctx, options.mgd_on)
        self.generator_block = AlignedGenerator(s_ch, t_ch)

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        terms = self.task_terms(student_out, labels)
        o = self.opts
        student, teacher = feature_map(student_out, o.mgd_on), feature_map(teacher_out, o.mgd_on)
        b, _, h, w = teacher.shape
        keep = random_keep_mask(self.rand(b, 1, h, w, device=teacher.device), o.mgd_lambda)
        terms["mgd"] = o.mgd_alpha * mgd_loss(self.generator_block, student, teacher, keep)
        if o.mgd_logit_weight > 0:
            terms["mgd_logit"] = o.mgd_logit_weight * mgd_logit_loss(student_out["logits"], teacher_out["logits"],
                                                                     o.mgd_logit_tau)
        return terms
