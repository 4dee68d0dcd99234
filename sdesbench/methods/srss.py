"""`srss`: self-regulation for semantic segmentation (Zhang et al., ICCV 2021, "SR-SS").

A multi-exit architecture (MEA) on the student: every encoder stage except the last (which feeds
the decoder) gets an exit -- a small segmentation head and an image-level class-presence head --
created here, trained with the student and dropped at deployment (never in the student's state
dict). The decoder's output is the deepest exit. Losses:
- MEA segmentation: CE of every exit's prediction to the labels;
- MEA class presence: BCE of every exit's (and the main output's) image-level multi-label
  prediction to the classes present in the image's labels;
- SR-F (shallow-to-deep, "features regulated by the shallow ones"): the shallowest exit's
  prediction (arg-max, a hard pseudo-label) supervises every deeper output by CE;
- SR-L (deep-to-shallow, "shallow logits regulated by the deep ones"): the main output (detached)
  supervises every shallower exit, by a per-pixel KL (default) or, as the public code does, by BCE
  between the class-presence predictions.
"""
from __future__ import annotations

from typing import Literal

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sdesbench import IGNORE_INDEX
from sdesbench.config import rng
from sdesbench.errors import ConfigError
from sdesbench.methods.losses import hinton_kd_loss, pixel_ce, valid_mask
from sdesbench.methods.base import METHODS
from sdesbench.methods.student import Student

SrlForm = Literal["pixel_kl", "presence_bce"]  # SR-L: per-pixel KL, or class-presence BCE


class ExitHead(nn.Module):
    """One exit, as the public code's ClassLayer: two 3x3 conv-BN-ReLU, a 1x1 classifier (pixel
    logits), and a class-presence head: global average pooling of the logits, then Linear(C, C)."""

    def __init__(self, in_channels: int, num_classes: int, mid_channels: int):
        super().__init__()
        self.segment = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False), nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, mid_channels, 3, padding=1, bias=False), nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, num_classes, 1))
        self.presence = nn.Linear(num_classes, num_classes)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.segment(feature)
        return logits, self.presence(logits.mean(dim=(2, 3)))


def class_presence(labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Image-level multi-hot targets: B x C, 1 where the class occurs among the image's labelled pixels."""
    b = labels.shape[0]
    idx = labels.reshape(b, -1).masked_fill(labels.reshape(b, -1) == ignore_index, num_classes)
    hot = torch.zeros(b, num_classes + 1, device=labels.device).scatter_(1, idx, 1.0)
    return hot[:, :num_classes]


def presence_loss(presence_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MEA class-presence term: binary cross-entropy (sigmoid) averaged over images and classes;
    `targets` are 0/1 labels or, for SR-L, the deep exit's probabilities."""
    return F.binary_cross_entropy_with_logits(presence_logits.float(), targets.float())


def sr_feature_loss(shallow_logits: torch.Tensor, deeper_logits: list[torch.Tensor], labels: torch.Tensor,
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """SR-F (shallow-to-deep): sum over deeper outputs of CE(deeper, argmax(shallow)).

    The shallowest exit's arg-max is a hard pseudo-label (no gradient), as in the public code;
    all logits are at input size. Pixels ignored in `labels` stay ignored (the public code uses
    every pixel; here the suite's convention of labelled pixels only holds).
    """
    pseudo = shallow_logits.detach().argmax(1).masked_fill(~valid_mask(labels, ignore_index), ignore_index)
    return sum(pixel_ce(d, pseudo, ignore_index) for d in deeper_logits)


def sr_logit_loss(deep_logits: torch.Tensor, shallow_logits: list[torch.Tensor], labels: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """SR-L (deep-to-shallow), pixel form: sum over shallow exits of T^2 KL(softmax(deep/T) ||
    softmax(shallow/T)), the deep prediction detached, KL summed over classes and averaged over
    the labelled pixels."""
    valid = valid_mask(labels)
    target = deep_logits.detach()
    return sum(hinton_kd_loss(s, target, temperature, valid) for s in shallow_logits)


def sr_presence_loss(deep_presence: torch.Tensor, shallow_presence: list[torch.Tensor]) -> torch.Tensor:
    """SR-L (deep-to-shallow), public-code form: sum over shallow exits of BCE(shallow presence,
    sigmoid(deep presence)) with the deep probabilities detached as soft targets."""
    target = torch.sigmoid(deep_presence.detach().float())
    return sum(presence_loss(s, target) for s in shallow_presence)


@METHODS.register("srss")
class SelfRegulation(Student):
    """L = CE + w_exit sum CE(exits) + w_presence sum BCE(presence) + w_srf SR-F + w_srl SR-L.

    Defaults come from the public code (weights 0.2 classification, 0.8 segmentation, 1.0 for
    each SR term), divided by 0.8 so that the main CE keeps weight 1 like every other method here:
    w_exit 1.0, w_presence 0.25, w_srf = w_srl = 1.25. Exits (mid width 256 as public) on every
    encoder stage but the last. Included: MEA segmentation and class-presence heads, SR-F, SR-L.
    Simplified / chosen: exits read the encoder stages the model exposes (not every residual
    block); SR-L defaults to a per-pixel KL at T = 1 (`srl_form: presence_bce` gives the public
    code's image-level BCE form); labelled pixels only in every pixel term. The exits are extra
    training cost only; the deployed student is unchanged.
    """
    logged_terms = ("ss", "exit_ce", "presence", "sr_f", "sr_l")
    conformance = "srss.json"
    option_prefix = ""

    @dataclass
    class Options(Student.Options):
        exit_weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of the exits' CE"))
        presence_weight: float = field(default=0.25, metadata=rng(0.0, doc="weight of the class-presence BCE"))
        srf_weight: float = field(default=1.25, metadata=rng(0.0, doc="weight of SR-F (shallow-to-deep)"))
        srl_weight: float = field(default=1.25, metadata=rng(0.0, doc="weight of SR-L (deep-to-shallow)"))
        srl_form: SrlForm = "pixel_kl"
        temperature: float = field(default=1.0, metadata=rng(1e-3, doc="SR-L KL temperature"))
        exit_channels: int = field(default=256, metadata=rng(1, doc="width of the exit heads"))

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        channels = list(ctx.model.stage_channels)
        if len(channels) < 2:
            raise ConfigError("srss needs a model with at least 2 encoder stages (one exit besides the decoder)")
        self.exits = nn.ModuleList(ExitHead(c, ctx.num_classes, options.exit_channels) for c in channels[:-1])
        self.main_presence = nn.Linear(ctx.num_classes, ctx.num_classes)

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        terms = super().loss_terms(student_out, labels, step, teacher_out)
        o = self.opts
        main = student_out["logits"]
        size = main.shape[-2:]
        exit_logits, exit_presence = [], []
        for head, feature in zip(self.exits, student_out["stages"]):
            logits, presence = head(feature)
            exit_logits.append(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))
            exit_presence.append(presence)
        main_presence = self.main_presence(main.mean(dim=(2, 3)))
        present = class_presence(labels, self.num_classes)
        terms["exit_ce"] = o.exit_weight * sum(pixel_ce(x, labels) for x in exit_logits)
        terms["presence"] = o.presence_weight * sum(presence_loss(p, present) for p in [main_presence, *exit_presence])
        terms["sr_f"] = o.srf_weight * sr_feature_loss(exit_logits[0], [*exit_logits[1:], main], labels)
        if o.srl_form == "pixel_kl":
            terms["sr_l"] = o.srl_weight * sr_logit_loss(main, exit_logits, labels, o.temperature)
        else:
            terms["sr_l"] = o.srl_weight * sr_presence_loss(main_presence, exit_presence)
        return terms
