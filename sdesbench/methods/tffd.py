"""`tffd`: teacher-free feature distillation (Li, "Self-Regulated Feature Learning via Teacher-free
Feature Distillation", ECCV 2022) on the encoder stages.

Two self-distillation terms, both plain squared L2 between features of the student itself:
- intra-layer: in each stage, the salient half of the channels teaches the other half;
- inter-layer: a deeper stage's feature (detached) teaches a shallower stage's feature.

Public code: lliai/Teacher-free-Distillation, train_kd.py (`intra_fd` and its `tfd` mode). With
`channel_match: truncate` and the default options, `loss_terms` reproduces that mode's
distillation loss, value and gradients (tests/conformance/tffd.json).
"""
from __future__ import annotations

from typing import Literal

from dataclasses import dataclass, field
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import nn

from sdesbench.config import rng
from sdesbench.methods.base import METHODS
from sdesbench.methods.student import Student

ChannelMatch = Literal["pool", "truncate", "adapter"]  # how a shallow map meets a deeper one's channel count
Pairing = Literal["all", "consecutive"]  # all stage pairs i < j, or consecutive stages only


def channel_saliency(feature: torch.Tensor) -> torch.Tensor:
    """Tf-FD's channel importance: each channel's map L2-normalised over positions, then its mean
    over batch and positions (the public code's ranking). C-vector; larger = more salient."""
    b, c = feature.shape[:2]
    flat = F.normalize(feature.float().reshape(b, c, -1), p=2, dim=2)
    return flat.mean(dim=(0, 2))


def intra_layer_loss(feature: torch.Tensor, detach_salient: bool = False) -> torch.Tensor:
    """Tf-FD intra-layer term: MSE(F_low, F_high), mean over all elements.

    Channels are sorted by `channel_saliency` (one ranking per batch); the top floor(C/2) channels
    teach the bottom floor(C/2) channels pairwise in rank order (i-th most salient of the top half
    -> i-th most salient of the bottom half). With odd C the middle channel is left out (the public
    code would fail on the shape mismatch). As in the public `intra_fd`, the gradient reaches both
    halves; `detach_salient=True` stops it on the salient half (a fixed target, MSE(F_low, sg(F_high))).
    The value is the same either way.
    """
    c = feature.shape[1]
    half = c // 2
    if half == 0:
        return feature.sum() * 0.0
    order = torch.argsort(channel_saliency(feature.detach()), descending=True)
    ranked = feature.float().index_select(1, order)
    salient = ranked[:, :half]
    return F.mse_loss(ranked[:, c - half:], salient.detach() if detach_salient else salient)


def match_channels(x: torch.Tensor, channels: int, mode: str) -> torch.Tensor:
    """Bring x (B x C x H x W) to `channels` <= C channels without parameters: "pool" averages
    contiguous channel groups (adaptive average pooling over the channel axis), "truncate" keeps
    the first `channels` channels (the Tf-FD public code)."""
    if x.shape[1] == channels:
        return x
    if mode == "truncate":
        return x[:, :channels]
    b, c, h, w = x.shape
    pooled = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(b * h * w, 1, c), channels)
    return pooled.reshape(b, h, w, channels).permute(0, 3, 1, 2)


def inter_layer_loss(shallow: torch.Tensor, deep: torch.Tensor, channel_match: ChannelMatch = "pool",
                     adapter: nn.Module | None = None) -> torch.Tensor:
    """Tf-FD inter-layer term: MSE(shallow, sg(deep)) after bringing both to a common shape.

    Spatial: both are adaptively average-pooled to (min(H_s, H_d), min(W_s, W_d)) -- the public
    code pools the larger map to the smaller one but assumes square maps; here height and width
    are matched separately, and equal sizes (output stride 8) are left alone. Channels: "pool" /
    "truncate" reduce the feature with more channels to the smaller count (`match_channels`);
    "adapter" maps the shallow feature to the deep channel count with the given trainable 1x1
    conv. The deeper feature is always detached. Mean over all elements.
    """
    size = (min(shallow.shape[-2], deep.shape[-2]), min(shallow.shape[-1], deep.shape[-1]))
    s = shallow.float() if shallow.shape[-2:] == size else F.adaptive_avg_pool2d(shallow.float(), size)
    d = deep.detach().float()
    d = d if d.shape[-2:] == size else F.adaptive_avg_pool2d(d, size)
    if channel_match == "adapter":
        s = adapter(s)
    else:
        c = min(s.shape[1], d.shape[1])
        s, d = match_channels(s, c, channel_match), match_channels(d, c, channel_match)
    return F.mse_loss(s, d)


def stage_pairs(num_stages: int, pairing: Pairing) -> list[tuple[int, int]]:
    """(shallow, deep) index pairs: every pair i < j ("all", as the public code's three pairs of
    three stages) or consecutive stages only."""
    if pairing == "consecutive":
        return [(i, i + 1) for i in range(num_stages - 1)]
    return list(combinations(range(num_stages), 2))


@METHODS.register("tffd")
class TeacherFreeFeatureDistillation(Student):
    """L = CE (Eq. 1) + ramp * (w_intra * mean_l L_intra(F_l) + w_inter * mean_(i<j) L_inter(F_i, F_j)).

    Defaults: intra_weight 8e-4 and inter_weight 5e-4, a linear ramp of the distillation weight over
    the first 1/12 of training (the public code ramps min(1, epoch / 20) over 240 epochs); intra-layer
    on every encoder stage, inter-layer on every pair of stages (averaged, as the public code averages
    its three pairs); channels matched by parameter-free channel pooling (`channel_match: pool`; the
    paper stresses that no transformation is needed, the public code truncates channels, and
    `adapter` adds a trainable 1x1 conv per pair, dropped at deployment). The base loss is the plain
    CE, as in the public `tfd` mode (its `tfd+` mode adds a teacher's KD).

    Weights: the public training commands (its README) set lambda_inter = 5e-4 and lambda_intra =
    8e-4 (the script's argparse defaults are 5e-3 and 4e-4), applied to the mean over its three
    stage pairs of the per-element MSE and to the mean over its three stages of the per-element
    `intra_fd` MSE. Here both terms have the same reduction -- per-element MSE, averaged over the
    stages and over the stage pairs -- so the public weights carry over unchanged: 8e-4 and 5e-4
    reproduce the public loss (checked to 1e-5 on three CIFAR-shaped stages,
    tests/conformance/tffd.json). The averages keep the scale for four stages (6 pairs) too.

    Gradient of the intra-layer term: the public `intra_fd` has no stop-gradient, so the salient
    half is pulled towards the other half as much as the reverse; `intra_detach_salient: false`
    (default) keeps that, `true` makes the salient half a fixed target, as a teacher usually is.
    """
    logged_terms = ("ss", "intra", "inter")
    conformance = "tffd.json"
    option_prefix = ""

    @dataclass
    class Options(Student.Options):
        intra_weight: float = field(default=8e-4, metadata=rng(0.0, doc="weight of the intra-layer term (public 8e-4)"))
        inter_weight: float = field(default=5e-4, metadata=rng(0.0, doc="weight of the inter-layer term (public 5e-4)"))
        intra_detach_salient: bool = False  # stop the intra-layer gradient on the salient half (public code: no)
        warmup_fraction: float = field(default=1 / 12, metadata=rng(0.0, 1.0, doc="linear ramp length (fraction)"))
        channel_match: ChannelMatch = "pool"
        pairing: Pairing = "all"

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        channels = list(ctx.model.stage_channels)
        self.pairs = stage_pairs(len(channels), options.pairing)
        self.adapters = nn.ModuleList()
        if options.channel_match == "adapter":
            self.adapters.extend(nn.Conv2d(channels[i], channels[j], 1, bias=False) for i, j in self.pairs)

    def ramp(self, step) -> float:
        span = self.opts.warmup_fraction * step.total_iters
        return 1.0 if span <= 0 else min(1.0, (step.iteration + 1) / span)

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        terms = super().loss_terms(student_out, labels, step, teacher_out)
        o, stages, ramp = self.opts, student_out["stages"], self.ramp(step)
        intra = torch.stack([intra_layer_loss(f, o.intra_detach_salient) for f in stages]).mean()
        inter = stages[0].new_zeros((), dtype=torch.float32)
        if self.pairs:
            inter = torch.stack([
                inter_layer_loss(stages[i], stages[j], o.channel_match, self.adapters[k] if len(self.adapters) else None)
                for k, (i, j) in enumerate(self.pairs)]).mean()
        terms["intra"] = ramp * o.intra_weight * intra
        terms["inter"] = ramp * o.inter_weight * inter
        return terms
