"""`sdes`: Self-Decoupling and Ensemble Distillation (Liu, Zhang, Wang, AAAI 2023), Eqs. 2-12.

No public implementation of SDES exists; this file is the suite's reference. Every choice the
paper leaves open is listed here (and in docs/sdes.md) with the alternative exposed as an option.

DPED, decoupled prediction ensemble distillation (Eqs. 2-5)
- N expert decoders read the shared encoder's stages DETACHED, so the expert losses never reach
  the encoder (paper: "it's not necessary to be updated by the back-propagation from each expert").
- `class_groups`: classes ranked by training-pixel count ("more to less") and cut into N
  contiguous chunks of the ranked list. Open: how the ranked list is cut. Default
  `split_sizes: equal` (chunk sizes differ by at most one class, bigger chunks first, like
  numpy.array_split); `natural` cuts where log pixel counts jump (optimal 1-D clustering).
  `isolate: [0]` puts class 0 alone in a group (the paper's VOC setting: background alone, the 20
  foreground classes in 4 groups). `split: random` (Table 4 "Rand") ranks by a seeded permutation
  instead of by frequency, with the same chunk sizes; the seed is `split_seed` or the run's seed.
- Expert output (open): `expert_classes: all` (default) outputs C logits, as Eqs. 3-4 are written
  (P^{T,n} enters Eq. 4 unchanged, CE over C classes on the expert's pixels). `subset` outputs
  |Psi_n| logits (CE over the subset only); they enter Eq. 4 through `subset_to_full_logits`: the
  classes outside Psi_n keep the student's logits and the subset's logits are shifted so their
  log-sum-exp equals the student's over Psi_n, i.e. the teacher keeps the student's probability
  of the subset and the expert redistributes it inside the subset.
- Eq. 3 (`expert_ce_loss`): CE over the pixels of M^n, mean over |M^n|, then 1/N over experts.
  An expert whose classes are absent from the batch contributes 0 (still divided by N).
- Eq. 4 (`ensemble_logits`): expert n fills pixels whose label is in Psi_n; the student fills the
  rest (ignored pixels). The result is detached (a soft target). Experts are upsampled
  bilinearly to the input size first, like the student's logits.
- Eq. 5 (`dped_loss`): KL(softmax(P/tau) || softmax(P^T/tau)) as printed (student first), mean
  over all B x H x W pixels as printed (1/(H x W)); ignored pixels have P^T = P and add 0.
  Times tau^2 by default (`tau_squared: true`): Eq. 5 prints no such factor, but without it the
  KL's gradient shrinks by 1/tau^2 (standard KD restores it) and at alpha = 0.5, tau = 5 the
  DPED gradient at the encoder is ~1% of L_SS's, too small for Fig. 3(a)'s optimum at alpha = 0.5
  (measured: docs/sdes.md, "Loss balance"). `tau_squared: false` is Eq. 5 as printed.
  `kl_direction: teacher_first` gives standard KD's KL(teacher || student).
- Expert architecture: `light` (two convolutions, ~0.01 M parameters on ResNet-18 with 19
  classes: the Cityscapes setting) or `student` (`model.build_decoder`: the CamVid setting).

DFED, decoupled feature ensemble distillation (Eqs. 6-11), over the model's `stages` list
(DeepLabV3-ResNet: layer1..layer4; layer2..4 share stride 8, so only layer1 is downsampled)
- Eq. 6: w = sum over positions of |F|^p, per image, stage and channel.
- Eqs. 7-8: keep the top k = max(1, floor(gamma * C_l)) channels per image (torch.topk: exactly k,
  ties broken by topk). gamma = 0 keeps the single top channel: Eq. 7 selects w >= h_gamma(w),
  and the threshold of the top-0 weights is the maximum weight, which its own channel meets.
- Downsampling of the first L-1 kept maps to H_L x W_L (open): `downsample: avg` (adaptive
  average pooling, default) or `bilinear` (anti-aliased). Selection happens before downsampling.
- Eq. 9 (open: how C channels collapse into an H_L x W_L map): `attention: at` (default) is
  attention transfer's mean over channels of squared activations; `mean_abs` uses |F|. The map
  is divided by its L2 norm over the H_L x W_L positions (per image).
- Eq. 10: element-wise max over the first L-1 maps = expert map A^T, detached (computed under
  no_grad). Eq. 11 (open: distance and batch reduction): `dfed_distance: squared_mean`
  (default) is attention transfer's mean over images and positions of the squared difference,
  the scale on which AT's weights and the paper's beta in [1, 500] live; `l2` (as printed) is
  the per-image L2 norm ||A_L - A^T||_2 averaged over images, whose gradient at the encoder is
  15-43x L_SS's at beta = 100 (measured: docs/sdes.md, "Loss balance").

Total (Eq. 12): (L_SS + L_SS^T) + alpha * L_DPED + beta * L_DFED, returned as the weighted terms
{"ss", "ss_experts", "dped", "dfed"}. Without DPED (`use_dped: false`) no experts are built (they
would not change the student: their input is detached) and no Ens-T is reported.
Expert decoders live in this module, never in the model: the deployed student is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sdesbench import IGNORE_INDEX
from sdesbench.config import rng
from sdesbench.errors import ConfigError
from sdesbench.methods.base import METHODS, Method, MethodContext
from sdesbench.methods.losses import class_kl_map, pixel_ce
from sdesbench.models.experts import LightExpertDecoder

ExpertKind = Literal["light", "student"]  # two-convolution experts (Cityscapes) | the student's decoder (CamVid)
ExpertClasses = Literal["all", "subset"]
SplitMode = Literal["more_to_less", "random"]
SplitSizes = Literal["equal", "natural"]
KLDirection = Literal["student_first", "teacher_first"]  # Eq. 5 as printed | standard KD
Attention = Literal["at", "mean_abs"]
Downsample = Literal["avg", "bilinear"]
DfedDistance = Literal["squared_mean", "l2"]  # attention transfer's scale | Eq. 11 as printed

# ----------------------------------------------------------------------------- class groups (Eq. 2)


def _natural_sizes(log_counts: list[float], n_groups: int) -> list[int]:
    """Chunk sizes of the optimal contiguous partition of a sorted list (min within-chunk SSE)."""
    n = len(log_counts)
    prefix, prefix_sq = [0.0], [0.0]
    for v in log_counts:
        prefix.append(prefix[-1] + v)
        prefix_sq.append(prefix_sq[-1] + v * v)

    def sse(i: int, j: int) -> float:  # items i..j-1
        s, m = prefix[j] - prefix[i], j - i
        return prefix_sq[j] - prefix_sq[i] - s * s / m

    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(n_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(n_groups + 1)]
    cost[0][0] = 0.0
    for g in range(1, n_groups + 1):
        for j in range(g, n + 1):
            for i in range(g - 1, j):  # last chunk is i..j-1; strict < keeps the earliest cut on ties
                c = cost[g - 1][i] + sse(i, j)
                if c < cost[g][j] - 1e-12:
                    cost[g][j], cut[g][j] = c, i
    sizes, j = [], n
    for g in range(n_groups, 0, -1):
        sizes.append(j - cut[g][j])
        j = cut[g][j]
    return sizes[::-1]


def class_groups(pixel_counts: Sequence[int] | torch.Tensor, n_groups: int, mode: SplitMode = "more_to_less",
                 seed: int = 0, isolate: Sequence[int] = (), sizes: SplitSizes = "equal") -> list[list[int]]:
    """Eq. 2's class subsets Psi_1..Psi_N: disjoint, covering every class.

    `more_to_less`: classes sorted by pixel count, descending (ties: lower class index first), cut
    into `n_groups` contiguous chunks. `sizes="equal"`: chunk sizes differ by at most one, the
    larger chunks first (numpy.array_split). `sizes="natural"`: the cut minimising the summed
    within-chunk squared deviation of log(1 + count) (optimal 1-D clustering by dynamic
    programming), so each group holds classes of similar frequency. `random`: a permutation drawn
    from torch.Generator().manual_seed(seed) replaces the ranking; chunk sizes are those the
    ranking would get. `isolate`: each listed class forms its own group (listed first); the
    remaining classes fill the other n_groups - len(isolate) groups.
    """
    counts = [int(c) for c in (pixel_counts.tolist() if isinstance(pixel_counts, torch.Tensor) else pixel_counts)]
    num_classes = len(counts)
    isolate = [int(c) for c in isolate]
    if len(set(isolate)) != len(isolate) or any(not 0 <= c < num_classes for c in isolate):
        raise ConfigError(f"method.isolate={isolate} must list distinct classes in [0, {num_classes - 1}]")
    rest = [c for c in range(num_classes) if c not in isolate]
    n_rest = n_groups - len(isolate)
    if n_rest < (1 if rest else 0) or n_rest > len(rest):
        raise ConfigError(f"method.n_experts={n_groups} cannot split {num_classes} classes with "
                          f"{len(isolate)} isolated (needs {len(isolate) + 1}..{num_classes})")
    if mode not in ("more_to_less", "random"):
        raise ValueError(f"method.split must be more_to_less or random, got {mode!r}")
    if sizes not in ("equal", "natural"):
        raise ValueError(f"method.split_sizes must be equal or natural, got {sizes!r}")
    ranked = sorted(rest, key=lambda c: (-counts[c], c))
    if sizes == "equal":
        base, extra = divmod(len(ranked), max(n_rest, 1))
        chunk_sizes = [base + (1 if g < extra else 0) for g in range(n_rest)]
    else:
        chunk_sizes = _natural_sizes([math.log1p(counts[c]) for c in ranked], n_rest)
    if mode == "random":
        perm = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
        ranked = [rest[i] for i in perm]
    groups, start = [[c] for c in isolate], 0
    for size in chunk_sizes:
        groups.append(ranked[start:start + size])
        start += size
    return groups


def _group_lookup(groups: list[list[int]], device: torch.device | None = None) -> torch.Tensor:
    """Label value (0..255) -> index of its group, -1 for labels in no group (ignore index)."""
    lookup = torch.full((256,), -1, dtype=torch.long)
    for n, group in enumerate(groups):
        lookup[torch.tensor(group, dtype=torch.long)] = n
    return lookup.to(device) if device is not None else lookup


# ----------------------------------------------------------------------------- DPED (Eqs. 3-5)


def expert_ce_loss(expert_logits: list[torch.Tensor], groups: list[list[int]], labels: torch.Tensor,
                   expert_classes: str = "all", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Eq. 3: L_SS^T = 1/N sum_n CE of expert n over the pixels of M^n (mean over |M^n|).

    `all`: expert n gives C logits, labels outside Psi_n are ignored. `subset`: it gives |Psi_n|
    logits and labels are renumbered to their position in Psi_n. An absent subset adds 0.
    """
    if expert_classes == "all":
        routed, group_of = route_to_experts(expert_logits[0].detach(), expert_logits, groups, labels, ignore_index)
        return routed_expert_ce(routed, group_of, labels, len(groups), ignore_index)
    total = expert_logits[0].sum() * 0.0
    for logits, group in zip(expert_logits, groups):
        remap = torch.full((256,), ignore_index, dtype=torch.long, device=labels.device)
        remap[torch.tensor(group, dtype=torch.long, device=labels.device)] = torch.arange(len(group),
                                                                                          device=labels.device)
        total = total + pixel_ce(logits, remap[labels.clamp(0, 255)], ignore_index)
    return total / len(groups)


def routed_expert_ce(routed: torch.Tensor, group_of: torch.Tensor, labels: torch.Tensor, n_groups: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Eq. 3 for C-logit experts as one weighted CE over `route_to_experts`' output: pixel i of
    group n weighs 1 / (N |M^n|). Same value and gradients as N separate masked CEs, but one
    log-softmax is kept for backward instead of N (the memory of the expert losses).
    """
    group_of = group_of.squeeze(1)
    mask_sizes = torch.stack([(group_of == n).sum() for n in range(n_groups)]).clamp_min(1)
    weight = torch.where(group_of >= 0, 1.0 / (n_groups * mask_sizes[group_of.clamp_min(0)]), 0.0)
    target = torch.where(group_of >= 0, labels, torch.full_like(labels, ignore_index))
    ce = F.cross_entropy(routed.float(), target, ignore_index=ignore_index, reduction="none")
    return (ce * weight).sum()


def route_to_experts(student_logits: torch.Tensor, expert_logits: list[torch.Tensor], groups: list[list[int]],
                     labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 2 and 4 without detaching the experts: pixel i takes the logits of the expert whose
    subset holds its label (mask M^n), the detached student's where no expert does (ignored
    pixels). Returns (B x C x H x W logits, B x 1 x H x W group index, -1 = student).
    """
    if len(expert_logits) != len(groups):
        raise ValueError(f"{len(expert_logits)} expert outputs for {len(groups)} groups")
    group_of = _group_lookup(groups, labels.device)[labels.clamp(0, 255)]
    group_of = torch.where(labels == ignore_index, torch.full_like(group_of, -1), group_of).unsqueeze(1)
    out = student_logits.detach()
    for n, logits in enumerate(expert_logits):
        out = torch.where(group_of == n, logits.to(out.dtype), out)
    return out, group_of


def subset_to_full_logits(subset_logits: torch.Tensor, student_logits: torch.Tensor,
                          group: list[int]) -> torch.Tensor:
    """Map an expert's |Psi_n| logits to C logits for Eq. 4 (`expert_classes: subset`).

    Classes outside Psi_n keep the (detached) student logits; the expert's logits are shifted so
    that their log-sum-exp equals the student's over Psi_n. At tau = 1 the softmax is then: the
    student's probability outside Psi_n, and inside it the student's mass of Psi_n distributed as
    the expert says.
    """
    full = student_logits.detach().float().clone()
    idx = torch.tensor(group, dtype=torch.long, device=full.device)
    student_mass = full.index_select(1, idx).logsumexp(1, keepdim=True)
    sub = subset_logits.float()
    full[:, idx] = sub - sub.logsumexp(1, keepdim=True) + student_mass
    return full


def ensemble_logits(student_logits: torch.Tensor, expert_logits: list[torch.Tensor], groups: list[list[int]],
                    labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Eq. 4: P^T = sum_n M^n * P^{T,n} + (1 - sum_n M^n) * P, detached.

    Every tensor is B x C x H x W (experts already at the labels' size); M^n (Eq. 2) is 1 where
    the label is in Psi_n, so ignored pixels (and classes in no group) take the student's logits.
    """
    return route_to_experts(student_logits, expert_logits, groups, labels, ignore_index)[0].detach()


def dped_loss(student_logits: torch.Tensor, ensemble_logits: torch.Tensor, tau: float,
              kl_direction: KLDirection = "student_first") -> torch.Tensor:
    """Eq. 5: 1/(B H W) sum_i KL(softmax(P_i/tau) || softmax(P^T_i/tau)) (the method multiplies by tau^2).

    `student_first` is Eq. 5 as printed; `teacher_first` is standard KD's KL(P^T || P). The mean
    is over every pixel (B x H x W), as printed; the target is detached.
    """
    target = ensemble_logits.detach()
    if kl_direction == "student_first":
        kl = class_kl_map(student_logits, target, tau)
    elif kl_direction == "teacher_first":
        kl = class_kl_map(target, student_logits, tau)
    else:
        raise ValueError(f"method.kl_direction must be student_first or teacher_first, got {kl_direction!r}")
    return kl.mean()


# ----------------------------------------------------------------------------- DFED (Eqs. 6-11)


def reuse_channels(feature: torch.Tensor, gamma: float, p: float = 1) -> torch.Tensor:
    """Eqs. 6-8: per image, the k = max(1, floor(gamma * C)) channels with the largest sum |F|^p."""
    b, c, h, w = feature.shape
    k = max(1, math.floor(gamma * c + 1e-6))  # 1e-6: 0.29 * 100 is 28.999999999999996 in floats
    weights = feature.abs().pow(p).sum(dim=(2, 3))  # Eq. 6, B x C
    idx = weights.topk(k, dim=1).indices
    return feature.gather(1, idx[:, :, None, None].expand(b, k, h, w))


def attention_map(feature: torch.Tensor, attention: Attention = "at") -> torch.Tensor:
    """Eq. 9: channels collapsed into one H x W map, divided by its L2 norm; returns B x (H W)."""
    if attention == "at":
        a = feature.pow(2).mean(1)
    elif attention == "mean_abs":
        a = feature.abs().mean(1)
    else:
        raise ValueError(f"method.attention must be at or mean_abs, got {attention!r}")
    return F.normalize(a.flatten(1), p=2, dim=1)


def _resize(feature: torch.Tensor, size: torch.Size, downsample: Downsample) -> torch.Tensor:
    if feature.shape[-2:] == size:
        return feature
    if downsample == "avg":
        return F.adaptive_avg_pool2d(feature, size)
    if downsample == "bilinear":
        return F.interpolate(feature, size=size, mode="bilinear", align_corners=False, antialias=True)
    raise ValueError(f"method.downsample must be avg or bilinear, got {downsample!r}")


def dfed_loss(stage_features: list[torch.Tensor], gamma: float, p: float = 1, attention: Attention = "at",
              downsample: Downsample = "avg", distance: DfedDistance = "squared_mean") -> torch.Tensor:
    """Eqs. 6-11: distance between the last stage's attention map and the detached element-wise
    max of the first L-1 stages' attention maps (each from its top-gamma channels, downsampled).

    `distance="l2"`: mean over images of ||A_L - A^T||_2 (Eq. 11 as printed); `"squared_mean"`:
    mean over images and positions of (A_L - A^T)^2 (attention transfer's form).
    """
    if len(stage_features) < 2:
        raise ConfigError("DFED needs a model with at least two encoder stages")
    *front, last = stage_features
    size = last.shape[-2:]
    with torch.no_grad():  # Eq. 10: the expert map carries no gradient
        maps = [attention_map(_resize(reuse_channels(f.float(), gamma, p), size, downsample), attention)
                for f in front]
        expert = torch.stack(maps).amax(0)
    student = attention_map(last.float(), attention)
    diff = student - expert
    if distance == "l2":
        return diff.norm(p=2, dim=1).mean()
    if distance == "squared_mean":
        return diff.pow(2).mean()
    raise ValueError(f"method.dfed_distance must be l2 or squared_mean, got {distance!r}")


# ----------------------------------------------------------------------------- experts and method


def _bilinear_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """n_out x n_in weights of 1-D linear interpolation with align_corners=False (PyTorch's rule:
    source = (target + 0.5) * n_in / n_out - 0.5, clamped at 0; the upper neighbour clamped)."""
    dst = torch.arange(n_out, dtype=torch.float64)
    src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.index_put_((torch.arange(n_out), lo), 1 - frac, accumulate=True)
    m.index_put_((torch.arange(n_out), hi), frac, accumulate=True)
    return m.to(device=device, dtype=dtype)


def bilinear_upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """F.interpolate(x, size, mode="bilinear", align_corners=False) as two matrix products.

    Same values (up to float rounding); the backward pass is two matmuls instead of
    upsample_bilinear2d_backward, which is slow on CPU and non-deterministic on CUDA. The expert
    logits of every step go through it (see docs/sdes.md, cost section).
    """
    h, w = x.shape[-2:]
    rows = _bilinear_matrix(h, int(size[0]), x.device, x.dtype)
    cols = _bilinear_matrix(w, int(size[1]), x.device, x.dtype)
    return rows @ x @ cols.T


@METHODS.register("sdes")
class SDES(Method):
    """SDES (Eq. 12): (L_SS + L_SS^T) + alpha L_DPED + beta L_DFED. See the module docstring."""
    logged_terms = ("ss", "ss_experts", "dped", "dfed")
    conformance = None
    no_conformance_because = ("the SDES authors published no code; its terms are checked against hand computations "
                              "(tests/test_sdes.py)")
    option_prefix = ""

    @dataclass
    class Options:
        n_experts: int = field(default=4, metadata=rng(1, doc="N expert decoders (<= classes)"))
        expert: ExpertKind = "light"
        light_hidden: int = field(default=16, metadata=rng(1, doc="hidden width of the light expert (16 reproduces the paper's Ens-T 15.94 M / 134.34 G)"))
        expert_classes: ExpertClasses = "all"  # logits per expert
        split: SplitMode = "more_to_less"
        split_sizes: SplitSizes = "equal"
        split_seed: int | None = field(default=None, metadata=rng(0, doc="random split seed (default: run seed)"))
        isolate: list[int] = field(default_factory=list)  # classes alone in a group (VOC: [0])
        tau: float = field(default=10.0, metadata=rng(1e-6, doc="DPED temperature"))
        tau_squared: bool = True  # multiply L_DPED by tau^2 (standard KD; Eq. 5 prints no factor)
        kl_direction: KLDirection = "student_first"
        alpha: float = field(default=0.5, metadata=rng(0.0))
        beta: float = field(default=100.0, metadata=rng(0.0))
        gamma: float = field(default=0.5, metadata=rng(0.0, 1.0))
        p: float = field(default=1.0, metadata=rng(1e-6))
        attention: Attention = "at"
        downsample: Downsample = "avg"
        dfed_distance: DfedDistance = "squared_mean"
        use_dped: bool = True
        use_dfed: bool = True

    @classmethod
    def check_options(cls, opts: Any, num_classes: int | None) -> None:
        if num_classes is not None:
            if opts.n_experts > num_classes:
                raise ConfigError(f"method.n_experts={opts.n_experts} exceeds the dataset's {num_classes} classes")
            class_groups([1] * num_classes, opts.n_experts, isolate=opts.isolate)  # validates `isolate`

    def __init__(self, options: Any, ctx: MethodContext):
        super().__init__(options, ctx)
        o = self.opts
        self.groups: list[list[int]] = []
        self.experts = nn.ModuleList()
        if o.use_dped:
            seed = ctx.seed if o.split_seed is None else o.split_seed
            self.groups = class_groups(ctx.class_pixel_counts(), o.n_experts, o.split, seed, o.isolate,
                                       o.split_sizes)
            for group in self.groups:
                n_out = self.num_classes if o.expert_classes == "all" else len(group)
                if o.expert == "light":
                    self.experts.append(LightExpertDecoder(ctx.model.stage_channels[-1], n_out, o.light_hidden))
                else:
                    self.experts.append(ctx.model.build_decoder(n_out))

    def _expert_logits(self, student_out: dict[str, Any]) -> list[torch.Tensor]:
        """Each expert on the detached stages, upsampled to the student's logits size."""
        stages = [s.detach() for s in student_out["stages"]]
        size = student_out["logits"].shape[-2:]
        low = [e(stages)["logits"] for e in self.experts]
        if len({x.shape for x in low}) == 1:  # one matmul upsampling for all experts
            return list(bilinear_upsample(torch.stack(low, 1), size).unbind(1))
        return [bilinear_upsample(x, size) for x in low]

    def _ensemble(self, student_logits: torch.Tensor, expert_logits: list[torch.Tensor],
                  labels: torch.Tensor) -> torch.Tensor:
        if self.opts.expert_classes == "subset":
            expert_logits = [subset_to_full_logits(e, student_logits, g) for e, g in zip(expert_logits, self.groups)]
        return ensemble_logits(student_logits, expert_logits, self.groups, labels)

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        o = self.opts
        logits = student_out["logits"]
        terms = {"ss": pixel_ce(logits, labels)}
        if o.use_dped:
            expert_logits = self._expert_logits(student_out)
            if o.expert_classes == "all":  # one routed tensor serves Eq. 3 and Eq. 4 (saves memory)
                routed, group_of = route_to_experts(logits, expert_logits, self.groups, labels)
                terms["ss_experts"] = routed_expert_ce(routed, group_of, labels, len(self.groups))
                target = routed.detach()
            else:
                terms["ss_experts"] = expert_ce_loss(expert_logits, self.groups, labels, o.expert_classes)
                target = self._ensemble(logits, expert_logits, labels)
            scale = o.tau ** 2 if o.tau_squared else 1.0
            terms["dped"] = o.alpha * scale * dped_loss(logits, target, o.tau, o.kl_direction)
        if o.use_dfed:
            terms["dfed"] = o.beta * dfed_loss(student_out["stages"], o.gamma, o.p, o.attention, o.downsample,
                                               o.dfed_distance)
        return terms

    def eval_predictions(self, student_out, labels):
        """Ens-T (Tables 2-3): the Eq. 4 ensemble; it reads the label masks, an oracle reference."""
        if not self.opts.use_dped:
            return {}
        return {"ens_t": self._ensemble(student_out["logits"], self._expert_logits(student_out), labels)}


@METHODS.register("sdes-no-dfed")
class SDESNoDFED(SDES):
    """Ablation "Ours w/o DFED" (Table 2) / L_SS + L_DPED (Table 4)."""
    logged_terms = ("ss", "ss_experts", "dped")
    conformance = None
    no_conformance_because = "an SDES ablation (as sdes)"
    option_prefix = ""

    @dataclass
    class Options(SDES.Options):
        use_dfed: bool = False


@METHODS.register("sdes-no-dped")
class SDESNoDPED(SDES):
    """Ablation "Ours w/o DPED" (Table 2) / L_SS + L_DFED (Table 4): no experts are built."""
    logged_terms = ("ss", "dfed")
    conformance = None
    no_conformance_because = "an SDES ablation (as sdes)"
    option_prefix = ""

    @dataclass
    class Options(SDES.Options):
        use_dped: bool = False


@METHODS.register("sdes-random-split")
class SDESRandomSplit(SDES):
    """Table 4 "Rand": classes grouped by a seeded random ranking instead of "more to less"."""
    logged_terms = ("ss", "ss_experts", "dped", "dfed")
    conformance = None
    no_conformance_because = "an SDES ablation (as sdes)"
    option_prefix = ""

    @dataclass
    class Options(SDES.Options):
        split: str = "random"
