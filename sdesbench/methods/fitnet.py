"""`fitnet`: hint learning (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015), the FitNet
row of CIRKD's table.

A regressor r (here a 1x1 convolution, trained with the student) maps the student's guided feature
F_S to the teacher's hint feature F_T, and the student learns to reproduce the hint (FitNets Eq. 3):

    L_HT = 1/2 * || F_T - r(F_S) ||_2^2                        (per example, the paper)
    L_FitNet = 1/(B*C_T*h*w) * sum_{b,c,i} (r(F_S) - F_T)_{bci}^2   (CIRKD losses/fitnet.py, computed here)

and L = L_SS (Eq. 1 of SDES) + aux_weight * CE(aux) + fitnet_weight * L_FitNet.

Reference code: winycg/CIRKD `losses/fitnet.py` (`CriterionFitNet`: 1x1 conv without bias from the
student's to the teacher's channels, then the mean squared error), called by `train_kd.py` on
`s_outputs[-1]` / `t_outputs[-1]`, the feature before the classifier (`x_feat_after_aspp`); its conv is
in the optimizer's parameter list. tests/conformance/fitnet.json holds its output.

Choices (the paper and CIRKD differ; what is computed and the alternative):
- Which features: the hint/guided layers are the feature before the classifier on both sides
  (`fitnet_on=decoder_feature`, CIRKD); `fitnet_on=last_stage` uses the last encoder stage instead
  (FitNets picks a middle layer of each network; the deepest stage is the closest thing the model
  contract offers besides the decoder feature).
- Regressor: always a 1x1 convolution without bias (`fitnet_adapter=always`, CIRKD builds it even when
  the channel counts are equal). FitNets uses a convolutional regressor to match the shapes; `auto`
  builds the 1x1 conv only when the counts differ (plain MSE otherwise); `never` compares the maps as
  they are (an error when the counts differ). The regressor is a module of the method: trained with the
  student, never part of the deployed student's weights.
- Reduction: mean over all B*C_T*h*w elements (`fitnet_reduction=mean`, CIRKD). `half_sum` is the paper's
  1/2 * squared L2 norm per example, averaged over the batch (C_T*h*w times larger / 2: it grows with the
  feature size, so its weight is not comparable across resolutions).
- Weight: fitnet_weight = 10, CIRKD's `--lambda-fitnet 10` (train_scripts/train_kd/train_fitnet.sh). That
  script also adds `--lambda-kd 1`: that recipe is the composite `fitnet+kd` (this term plus `kl`'s pixel
  KD, kd_weight 1, T 1), the FitNet row of the `cirkd` table; `fitnet` stays the pure method.
- Schedule: FitNets trains in two stages (hints first, then KD on the whole network); CIRKD, and this
  method, add the hint term to the task loss from the first iteration. The paper's second stage is KD,
  i.e. a composite with `kl`, so it is not offered here.
- Sizes: when the spatial sizes differ, the regressed student map is resized (bilinear) to the teacher's.
- The teacher's feature is a detached target (gradients reach the student and the regressor only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from sdesbench.config import rng
from sdesbench.methods.base import METHODS, MethodContext
from sdesbench.methods.features import (AdapterMode, PixelKD, channel_adapter, feature_map,
                                         student_and_teacher_channels)
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions
from sdesbench.models.base import to_size

HintLayer = Literal["decoder_feature", "last_stage"]
Reduction = Literal["mean", "half_sum"]  # CIRKD's mean over elements | FitNets Eq. 3 (1/2 ||.||^2 per example)


def fitnet_hint_loss(regressed_student: torch.Tensor, teacher: torch.Tensor,
                     reduction: Reduction = "mean") -> torch.Tensor:
    """FitNets Eq. 3 between r(F_S) and F_T (same shape): mean of squared differences (CIRKD
    losses/fitnet.py) or, with `half_sum`, 1/2 * sum of squares per example averaged over the batch."""
    squared = (regressed_student.float() - teacher.detach().float()).pow(2)
    if reduction == "half_sum":
        return 0.5 * squared.sum() / teacher.shape[0]
    return squared.mean()


@METHODS.register("fitnet")
class FitNet(TeacherStudentMethod):
    """L = L_SS (Eq. 1) + fitnet_weight * ||r(F_S) - F_T||^2 (FitNets Eq. 3, CIRKD's mean); module docstring."""
    logged_terms = ("ss", "fitnet")
    conformance = "fitnet.json"
    option_prefix = "fitnet_"

    @dataclass
    class Options(TeacherStudentOptions):
        fitnet_weight: float = field(default=10.0, metadata=rng(0.0, doc="weight of the hint term (CIRKD: 10)"))
        fitnet_on: HintLayer = "decoder_feature"
        fitnet_adapter: AdapterMode = "always"
        fitnet_reduction: Reduction = "mean"

    def __init__(self, options, ctx: MethodContext):
        super().__init__(options, ctx)
        s_ch, t_ch = student_and_teacher_channels(ctx, options.fitnet_on)
        self.adapter = channel_adapter(s_ch, t_ch, options.fitnet_adapter, "fitnet_adapter",
                                       f"fitnet_on={options.fitnet_on}")

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        terms = self.task_terms(student_out, labels)
        student = feature_map(student_out, self.opts.fitnet_on)
        teacher = feature_map(teacher_out, self.opts.fitnet_on)
        if self.adapter is not None:
            student = self.adapter(student)
        student = to_size(student, teacher.shape[-2:])
        terms["fitnet"] = self.opts.fitnet_weight * fitnet_hint_loss(student, teacher, self.opts.fitnet_reduction)
        return terms


@METHODS.register("fitnet+kd")
class FitNetKD(PixelKD, FitNet):
    """FitNet + the pixel-wise KD term of `kl` (CIRKD's train_fitnet.sh: --lambda-kd 1 --lambda-fitnet 10)."""
    logged_terms = ("ss", "fitnet", "kd")
    conformance = None
    no_conformance_because = "the sum of fitnet and kl, each checked against its reference"
    option_prefix = "fitnet_"
