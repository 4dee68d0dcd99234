"""`cirkdv2`: CIRKD v2 (Yang, Wang, Yu et al., "CIRKDV2: Cross-Image Relational Knowledge Distillation with
Contextual Modeling for Efficient Semantic Segmentation", technical report, 2025), the CIRKD v2 row of the
`frontier` table. Its reference numbers are on the Cityscapes **test** split (winycg/CIRKD's README at
dab64db: DeepLabV3-R18 baseline 73.56, CIRKD v2 75.60, teacher R101 78.30), not val.

CIRKD v2 keeps every term of `cirkd+kd` (methods/cirkd.py: pixel-wise KD, the mini-batch pixel-to-pixel
relations and the memory pixel-to-pixel / pixel-to-region relations) and adds, on the feature before the
classifier:

- contextual modelling: the student's feature first passes a graph (non-local) block g (`ContextGraph`,
  CIRKD's losses/gcn.py): q, k, v = 1x1 convs C -> C/2, A = softmax(q^T k / sqrt(C/2)) over positions,
  g(F) = ReLU(BN(W_o [F ; ReLU(BN(W_1 (v A^T)))])); every feature term then reads g(F_S);
- a hint (FitNet) term: L_hint = mean((r(g(F_S)) - F_T)^2), r a 1x1 conv C_S -> C_T without bias;
- channel-wise cross-image relations: both maps are average-pooled 4 x 4 (ceil mode), the student's through
  its own projection head (1x1 conv, BN, ReLU, 1x1 conv; C_S -> C_T), and every channel becomes a unit
  vector over the P pooled positions: E_b (C x P) for image b. Then
    mini-batch channel-to-channel:  L_cb = 1/B^2 sum_{i,j} 1/C sum_c KL(softmax(E^T_i E^T_j^T / tau)[c] ||
                                                                       softmax(E^S_i E^S_j^T / tau)[c])
    memory channel-to-channel:      L_cm = T^2 / (B C) sum_{b,c} KL(softmax(E^T_bc X^T / (tau T)) ||
                                                                      softmax(E^S_bc X^T / (tau T)))
  with X `cirkdv2_channel_contrast` rows drawn from a queue of teacher channel vectors (after this batch's
  are pushed: `cirkdv2_channel_enqueue` (256) random rows of every rank's B x C channels, oldest first);
    channel MSE:                    L_cmse = mean((E^S - E^T)^2)

    L = L_SS (Eq. 1) + aux_weight CE(aux) + kd L_KD + hint L_hint + L_CIRKD(g(F_S), F_T)
        + lambda_cb L_cb + lambda_cm L_cm + lambda_cmse L_cmse

Weights, train_cirkdv2.py with scripts/train_cirkdv2/cityscapes/deeplabv3_resnet18.sh: kd 1 (T 1), hint 1,
CIRKD's 1 / 0.1 / 0.1 (cirkd_* options), lambda_cb 1, lambda_cm 0.1, lambda_cmse 100; tau 0.1, T 1; queues
of 20,000 / 2,000 / 10,000 and contrast sets of 4,096 / 1,024 / 2,048 (pixel / region / channel). The same
script trains 80,000 iterations at batch 8, lr 0.01, weight decay 1e-4: that is the table's protocol, not a
method option. The report's PDF was not available while this was written: the equations are what the
reference code computes.

Reference code: winycg/CIRKD at dab64dbb5e4172141166cf8434a80ce55d9d3aa7, `losses/cirkd_channel.py`
(`StudentSegChannelContrast`), `losses/gcn.py` (`GCN`), `losses/fitnet.py`, `losses/kd.py`,
`losses/cirkd_mini_batch.py`, `losses/cirkd_memory.py`, called by `train_cirkdv2.py`;
tests/conformance/cirkdv2.json holds what they returned.

Choices and differences from the reference code (the `cirkd` ones hold too: see methods/cirkd.py):
- The channel queue's width P is the pooled teacher map's size, known at the first step: the queue is
  created then (random unit vectors from torch's global generator, as the reference's initial queue) and
  saved in the checkpoint with its pointer; a later step with another map size is an error. The reference
  sizes it at build time as int(h*w/16) of a dummy forward at the crop size, which equals the pooled size
  only when 4 divides h and w (otherwise its first enqueue fails).
- Channel queue draws (one randperm of the gathered rows to enqueue, one of the slots to sample) come from
  torch's global generator after CIRKD's pixel/region draws, the reference's order, so the queues are the
  same on every rank and the conformance test replays them.
- Under DDP the enqueue gathers every rank's teacher channels (as the reference). The mini-batch channel
  term follows `cirkd_batch_scope` like the pixel one: `global` (default) relates every rank's images with
  gradients gathered back, `local` only this rank's (the reference, which gathers nothing there).
- `cirkdv2_channel_enqueue` may not exceed `cirkdv2_channel_memory` (an option error); the reference takes
  min(256, rows of the step) and fails only when those rows overflow the queue.
- GCN and hint: the reference routes the student's feature through the GCN only when --lambda-fitnet is
  not 0; here likewise (`cirkdv2_hint_weight=0` drops both, and every term reads the raw feature). The
  projection heads and the GCN use BatchNorm2d, converted to SyncBatchNorm by `train.sync_bn=true` under
  DDP; the reference hard-codes SyncBatchNorm (which fails without a process group) in its heads.
- The pixel-wise KD is `kl`'s term (`kd_term`, options `kd_*`) inside CIRKD v2's own objective, not a
  `PixelKD` composite (no registered method is CIRKD v2 without it). It averages over labelled pixels by
  default (`kd_valid_only`, the suite's convention); the reference's `CriterionKD` averages over every
  pixel: `kd_valid_only=false`. It reads the logits at input size (the model contract) where the reference
  reads the 1/8 ones: the same mean when the logits are nearest-upsampled, slightly different with the
  bilinear ones.
- Sizes: a student feature of another spatial size is resized (bilinear) to the teacher's after the GCN.
- The mini-batch pixel term pools 4 x 4 in the newest reference whenever the map is at least 256 x 256
  (never at the scripts' crops: 64 x 128 maps); here `cirkd_batch_pool` (1) as in `cirkd`.
- Precision: pooling, normalisation, similarities and softmaxes in float32 (`full_precision`); queues float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdesbench.config import rng
from sdesbench.errors import ConfigError, SdesbenchError
from sdesbench.methods.base import METHODS, MethodContext
from sdesbench.methods.cirkd import (CIRKD, CIRKDOptions, RelationMemory, batch_pixel_pair_loss, gather_batch,
                                     memory_relation_loss, projection_head)
from sdesbench.methods.features import channel_adapter, feature_map, student_and_teacher_channels
from sdesbench.methods.fitnet import fitnet_hint_loss
from sdesbench.methods.kl import KLOptions, kd_term
from sdesbench.methods.losses import fp32, full_precision
from sdesbench.methods.teacher_student import TeacherStudentOptions
from sdesbench.models.base import to_size


# ----------------------------------------------------------------------------- the losses


def channel_embeddings(feature: torch.Tensor, pool: int) -> torch.Tensor:
    """B x C x h x w -> B x C x P float32: average-pooled pool x pool (ceil mode), each channel an L2-unit
    vector over the P pooled positions."""
    pooled = F.avg_pool2d(fp32(feature), pool, pool, ceil_mode=True) if pool > 1 else fp32(feature)
    return F.normalize(pooled.flatten(2), p=2, dim=2)


def channel_mse_loss(s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    """L_cmse = mean((E^S - E^T)^2) over every channel vector's entries (the reference's channel MSE)."""
    return fitnet_hint_loss(s_emb, t_emb)


# The mini-batch channel term is `batch_pixel_pair_loss` of CIRKD with channels as its anchors (C x P
# embeddings instead of A x d) and the memory channel term is `memory_relation_loss` on the B*C channel
# rows against the contrast set: the same equations over the other axis.


# ----------------------------------------------------------------------------- the modules


class ContextGraph(nn.Module):
    """CIRKD v2's contextual block (losses/gcn.py `GCN`, module docstring): a non-local graph over positions
    whose output, concatenated with the input, is fused back to C channels."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        self.node_k = nn.Conv2d(channels, inner, 1, bias=False)
        self.node_v = nn.Conv2d(channels, inner, 1, bias=False)
        self.node_q = nn.Conv2d(channels, inner, 1, bias=False)
        self.conv1 = nn.Sequential(nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.out_conv = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                      nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        k, v, q = self.node_k(x).flatten(2), self.node_v(x).flatten(2), self.node_q(x).flatten(2)  # B x c x N
        with full_precision():  # the N x N attention
            attention = torch.softmax(torch.bmm(fp32(q).transpose(1, 2) * k.shape[1] ** -0.5, fp32(k)), dim=-1)
            context = torch.bmm(attention, fp32(v).transpose(1, 2)).transpose(1, 2)  # B x c x N
        context = self.conv1(context.reshape(b, -1, h, w).to(x.dtype))
        return self.out_conv(torch.cat([x, context], dim=1))


class ChannelMemory(nn.Module):
    """The queue of teacher channel vectors and its write pointer (buffers: in the checkpoint), created at
    the first enqueue with the pooled map's width (module docstring)."""

    def __init__(self, size: int, enqueue: int):
        super().__init__()
        self.size, self.enqueue_rows = size, enqueue
        self.register_buffer("queue", torch.zeros(size, 0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "queue")
        if saved is not None and saved.shape != self.queue.shape:
            self.queue.resize_(saved.shape)  # in place: the buffer stays the object DDP and the unit hold
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor) -> None:
        """Push `enqueue_rows` random rows of the (gathered) N x P teacher channels at the pointer (the last
        slots, and the pointer back to 0, when they would reach the end: the reference's rule)."""
        width = rows.shape[1]
        if self.queue.shape[1] == 0:
            self.queue.resize_(self.size, width)
            self.queue.copy_(F.normalize(torch.randn(self.size, width), dim=1))  # global generator (docstring)
        elif self.queue.shape[1] != width:
            raise SdesbenchError(f"cirkdv2's channel queue holds {self.queue.shape[1]}-position channels but this "
                                 f"step's pooled teacher map has {width} positions (the training crop changed size)")
        chosen = torch.randperm(rows.shape[0])[:self.enqueue_rows].to(rows.device)
        k, ptr = chosen.numel(), int(self.ptr)  # k <= size (check_options)
        start = self.size - k if ptr + k >= self.size else ptr
        self.queue[start:start + k] = F.normalize(rows[chosen].float(), dim=1)
        self.ptr.fill_(0 if ptr + k >= self.size else ptr + k)

    def sample(self, count: int) -> torch.Tensor:
        """`count` random rows of the queue (one randperm of the slots, as CIRKD's contrast sets)."""
        return RelationMemory.sample(self.queue.unsqueeze(0), count)


# ----------------------------------------------------------------------------- the method


@dataclass
class CIRKDv2Options:
    cirkdv2_hint_weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of the FitNet hint on the GCN feature (--lambda-fitnet; 0 drops the GCN)"))
    cirkdv2_channel_batch_weight: float = field(default=1.0, metadata=rng(0.0, doc="mini-batch channel relations (--lambda-minibatch-channel)"))
    cirkdv2_channel_memory_weight: float = field(default=0.1, metadata=rng(0.0, doc="memory channel relations (--lambda-memory-channel)"))
    cirkdv2_channel_mse_weight: float = field(default=100.0, metadata=rng(0.0, doc="channel MSE (--lambda-channel-kd)"))
    cirkdv2_channel_memory: int = field(default=10000, metadata=rng(1, doc="channel queue length (--channel-memory-size)"))
    cirkdv2_channel_contrast: int = field(default=2048, metadata=rng(1, doc="channels sampled per step (--channel-contrast-size)"))
    cirkdv2_channel_enqueue: int = field(default=256, metadata=rng(1, doc="teacher channels entering the queue per step"))
    cirkdv2_channel_pool: int = field(default=4, metadata=rng(1, doc="k x k average pooling before the channel terms"))


@METHODS.register("cirkdv2")
class CIRKDv2(CIRKD):
    """L = L_SS + KD + hint(GCN) + CIRKD's three terms + channel batch/memory/MSE (CIRKD v2); module docstring."""
    logged_terms = ("ss", "kd", "fitnet", "cirkd_batch", "cirkd_pixel", "cirkd_region", "channel_batch",
                    "channel_memory", "channel_mse")
    conformance = "cirkdv2.json"
    option_prefix = "cirkdv2_"

    @dataclass
    class Options(CIRKDv2Options, KLOptions, CIRKDOptions, TeacherStudentOptions):
        pass

    @classmethod
    def check_options(cls, opts, num_classes):
        super().check_options(opts, num_classes)
        if opts.cirkdv2_channel_enqueue > opts.cirkdv2_channel_memory:
            raise ConfigError(f"method.cirkdv2_channel_enqueue={opts.cirkdv2_channel_enqueue} exceeds "
                              f"method.cirkdv2_channel_memory={opts.cirkdv2_channel_memory} (a step's channels must "
                              "fit in the queue)")

    def __init__(self, options, ctx: MethodContext):
        super().__init__(options, ctx)  # CIRKD's terms, projection head and queues (`self.cirkd`)
        o = options
        s_ch, t_ch = student_and_teacher_channels(ctx, o.cirkd_on)
        if o.cirkdv2_hint_weight > 0:
            self.context = ContextGraph(s_ch)
            self.hint = channel_adapter(s_ch, t_ch, "always", "cirkdv2_hint_weight", f"cirkd_on={o.cirkd_on}")
        self.channel_projection = projection_head(s_ch, t_ch)
        self.channel_memory = ChannelMemory(o.cirkdv2_channel_memory, o.cirkdv2_channel_enqueue)

    def channel_terms(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.opts
        pool = o.cirkdv2_channel_pool
        projected = self.channel_projection(F.avg_pool2d(s, pool, pool, ceil_mode=True) if pool > 1 else s)
        with full_precision():
            s_emb, t_emb = channel_embeddings(projected, 1), channel_embeddings(t.detach(), pool)  # B x C x P
            if o.cirkd_batch_scope == "global":
                batch = batch_pixel_pair_loss(s_emb, t_emb, gather_batch(s_emb, with_gradient=True),
                                              gather_batch(t_emb), o.cirkd_tau)
            else:
                batch = batch_pixel_pair_loss(s_emb, t_emb, s_emb, t_emb, o.cirkd_tau)
            mse = channel_mse_loss(s_emb, t_emb)
            s_rows, t_rows = s_emb.flatten(0, 1), t_emb.flatten(0, 1)
            self.channel_memory.enqueue(gather_batch(t_rows))
            contrast = self.channel_memory.sample(o.cirkdv2_channel_contrast)
            memory = memory_relation_loss(s_rows, t_rows, contrast, o.cirkd_tau, o.cirkd_kd_tau)
        return {"channel_batch": o.cirkdv2_channel_batch_weight * batch,
                "channel_memory": o.cirkdv2_channel_memory_weight * memory,
                "channel_mse": o.cirkdv2_channel_mse_weight * mse}

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        o = self.opts
        terms = self.task_terms(student_out, labels)
        terms["kd"] = kd_term(o, student_out["logits"], teacher_out["logits"], labels)
        t = feature_map(teacher_out, o.cirkd_on).detach()
        s = feature_map(student_out, o.cirkd_on)
        if o.cirkdv2_hint_weight > 0:
            s = to_size(self.context(s), t.shape[-2:])
            terms["fitnet"] = o.cirkdv2_hint_weight * fitnet_hint_loss(self.hint(s), t)
        else:
            s = to_size(s, t.shape[-2:])
        pixel, region = self.cirkd.memory_terms(s, t, labels)  # CIRKD's draws first, then the channel queue's
        terms["cirkd_batch"] = o.cirkd_batch_weight * self.cirkd.batch_term(s, t)
        terms["cirkd_pixel"] = o.cirkd_pixel_weight * pixel
        terms["cirkd_region"] = o.cirkd_region_weight * region
        terms.update(self.channel_terms(s, t))
        return terms
