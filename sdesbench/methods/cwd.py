"""`cwd`: channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
Prediction", ICCV 2021), the paper's "CWD*" rows.

Each channel c of a map y (B x C x H x W) becomes a distribution over the H*W positions
(Shu et al. Eq. 2):  phi(y_c)_i = exp(y_c,i / tau) / sum_j exp(y_c,j / tau).  The loss (their Eq. 3
with the normalisation of Sec. 3.2) is

    L_CWD = tau^2 / (B * C) * sum_b sum_c sum_i phi(y^T_bc)_i * log( phi(y^T_bc)_i / phi(y^S_bc)_i )

i.e. KL(teacher || student) per channel, summed over positions, averaged over batch and
channels, times tau^2. L = L_SS (Eq. 1) + cwd_weight * L_CWD.

Choices:
- tau = 4 (Shu et al.'s setting for logits; mmrazor's config uses tau = 1 with weight 3).
- cwd_weight = 3 (the logit-distillation weight of the mmrazor / CIRKD CWD configs).
- On the logits by default (`cwd_on=logits`), at input size (the suite's output contract;
  public code distils the 1/8-resolution logits, which the upsampled ones interpolate: the
  tau^2/(B*C) normalisation does not depend on the number of positions). `cwd_on=decoder_feature`
  or `cwd_on=last_stage` distils features instead; the student map is then passed through a
  1x1 convolution (no bias, as CIRKD) to the teacher's channel count when the counts differ
  (`cwd_adapter=auto`), always (`always`) or never (`never`: differing counts are an error).
  The adapter is trained with the student and never enters its state dict.
- Normalisation with an adapter: C in tau^2/(B*C) is the channel count of the compared maps, the
  teacher's (`cwd_channel_norm=teacher`, default), so the term stays a mean over the C_T
  per-channel KLs whatever the student's width, as in Eq. 3 and in losses that receive the student
  map after its adapter (e.g. mmrazor's `ChannelWiseDivergence`, which reads C from the map it is
  given). CIRKD's `CriterionCWD` (winycg/CIRKD, losses/cwd.py) reads C from the student map before
  its 1x1 conv, i.e. divides by C_S: its value is C_T/C_S times ours. `cwd_channel_norm=student`
  reproduces it (tests/conformance/cwd.json). Without an adapter both choices are the same.
- When spatial sizes differ (features of different strides) the student map is resized
  (bilinear) to the teacher's size.

`cwd+kd+adv`, registered here beside the pure method, is the CWD row of CIRKD's table
(winycg/CIRKD `scripts/train_kd/train_cwd.sh`): CWD on the logits (weight 3) and on the feature before the
classifier (`cwd_feature_weight` 50, the same tau = 4), plus pixel KD (`--lambda-kd 1`, the `kl` term) and
the holistic adversarial term (`--lambda-adv 0.001 --lambda-d 0.1`, methods/adversarial.py). CIRKD's exact
reductions: `kd_valid_only=false cwd_channel_norm=student` (the latter matters only with an adapter).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sdesbench.config import rng
from sdesbench.methods.adversarial import AdversarialOptions, KDAdversarialMethod
from sdesbench.methods.base import METHODS, MethodContext
from sdesbench.methods.features import (AdapterMode, FeatureMap, channel_adapter, feature_map,
                                         student_and_teacher_channels)
from sdesbench.methods.kl import KLOptions
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions
from sdesbench.models.base import to_size

ChannelNorm = Literal["teacher", "student"]  # C in tau^2/(B*C): the compared maps' | CIRKD's (before its adapter)


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float, norm_channels: int | None = None) -> torch.Tensor:
    """Shu et al. 2021 Eq. 3: tau^2/(B*C) * sum_{b,c} KL(softmax_HW(teacher_bc/tau) || softmax_HW(student_bc/tau)).

    C is the teacher's channel count unless `norm_channels` names another (CIRKD's C_S; module docstring)."""
    b, c = teacher.shape[0], norm_channels or teacher.shape[1]
    log_p_t = F.log_softmax(teacher.detach().float().flatten(2) / tau, dim=2)
    log_p_s = F.log_softmax(student.float().flatten(2) / tau, dim=2)
    return tau ** 2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum() / (b * c)


@dataclass
class CWDOptions:
    cwd_weight: float = field(default=3.0, metadata=rng(0.0, doc="weight of the CWD term"))
    cwd_tau: float = field(default=4.0, metadata=rng(1e-3, doc="temperature of the per-channel softmax"))
    cwd_on: FeatureMap = "logits"
    cwd_adapter: AdapterMode = "auto"
    cwd_channel_norm: ChannelNorm = "teacher"


class CWDTerm(nn.Module):
    """The CWD term with its optional 1x1 adapter; shared by `cwd` and `rdd+cwd`."""

    def __init__(self, opts: CWDOptions, ctx: MethodContext):
        super().__init__()
        self.opts = opts
        s_ch, t_ch = student_and_teacher_channels(ctx, opts.cwd_on)
        self.adapter = channel_adapter(s_ch, t_ch, opts.cwd_adapter, "cwd_adapter", f"cwd_on={opts.cwd_on}")

    def forward(self, student_out: dict[str, Any], teacher_out: dict[str, Any]) -> torch.Tensor:
        s = feature_map(student_out, self.opts.cwd_on)
        t = feature_map(teacher_out, self.opts.cwd_on)
        norm_channels = s.shape[1] if self.opts.cwd_channel_norm == "student" else None
        if self.adapter is not None:
            s = self.adapter(s)
        s = to_size(s, t.shape[-2:])
        return self.opts.cwd_weight * cwd_loss(s, t, self.opts.cwd_tau, norm_channels)


@METHODS.register("cwd")
class CWD(TeacherStudentMethod):
    """L = L_SS (Eq. 1) + cwd_weight * L_CWD (Shu et al. 2021 Eq. 3); see the module docstring."""
    logged_terms = ("ss", "cwd")
    conformance = "cwd.json"
    option_prefix = "cwd_"

    @dataclass
    class Options(CWDOptions, TeacherStudentOptions):
        pass

    def __init__(self, options, ctx: MethodContext):
        super().__init__(options, ctx)
        self.cwd = CWDTerm(options, ctx)

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        terms = self.task_terms(student_out, labels)
        terms["cwd"] = self.cwd(student_out, teacher_out)
        return terms


@dataclass
class CWDFeatureOptions:
    cwd_feature_weight: float = field(default=50.0, metadata=rng(0.0, doc="weight of the feature CWD term "
                                                                          "(CIRKD --lambda-cwd-fea 50)"))
    cwd_feature_on: FeatureMap = "decoder_feature"


@METHODS.register("cwd+kd+adv")
class CWDKDAdv(KDAdversarialMethod):
    """CIRKD's CWD row: L_SS + aux + CWD on the logits (`cwd`, 3) + CWD on the feature before the classifier
    (`cwd_feature`, 50, its adapter when the widths differ) + pixel KD (`kd`, 1) + the holistic adversarial
    term (`adv`, 0.001; the discriminator's own update `adv_d`, 0.1), as `scripts/train_kd/train_cwd.sh`
    runs it. Both CWD terms share `cwd_tau`, `cwd_adapter` and `cwd_channel_norm`."""
    logged_terms = ("ss", "cwd", "cwd_feature", "kd", "adv", "adv_d")
    conformance = "skd.json"
    option_prefix = "cwd_"

    @dataclass
    class Options(CWDFeatureOptions, CWDOptions, KLOptions, AdversarialOptions, TeacherStudentOptions):
        pass

    def __init__(self, options, ctx: MethodContext):
        super().__init__(options, ctx)
        o = options
        self.cwd = CWDTerm(o, ctx)
        self.cwd_feature = CWDTerm(CWDOptions(o.cwd_feature_weight, o.cwd_tau, o.cwd_feature_on, o.cwd_adapter,
                                              o.cwd_channel_norm), ctx)

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        terms = self.task_terms(student_out, labels)
        terms["cwd"] = self.cwd(student_out, teacher_out)
        terms["cwd_feature"] = self.cwd_feature(student_out, teacher_out)
        terms.update(self.kd_and_adversarial_terms(student_out, labels, teacher_out))
        return terms
