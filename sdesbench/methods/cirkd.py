"""`cirkd`, `cirkd+kd`: cross-image relational distillation (Yang, Zhou, An, Jiang, Xu & Zhang,
"Cross-Image Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022), the CIRKD row of
CIRKD's table.

The student learns how the teacher relates pixels to pixels and regions *across images*. On the feature
before the classifier, each pixel becomes a unit embedding (L2-normalised over channels); F_b (A x d,
A = h*w pixels) holds image b's embeddings, and every similarity is a dot product of unit vectors.

Mini-batch pixel-to-pixel distillation (CIRKD Sec. 3, "mini-batch-based pixel-to-pixel"): for every
ordered pair of images (i, j) of the mini-batch of B images, S_ij = F_i F_j^T (A x A), and each row a
(pixel a of image i against every pixel of image j) becomes a distribution at temperature tau:

    L_batch = 1/B^2 sum_{i,j} 1/A sum_a KL( softmax(S^T_ij[a] / tau) || softmax(S^S_ij[a] / tau) )

Memory-based distillation (CIRKD Sec. 3, "memory-based pixel-to-pixel" and "pixel-to-region"): two
queues of *teacher* embeddings per class, Q_p (pixel embeddings, `cirkd_pixel_memory` per class) and Q_r
(region embeddings: the mean embedding of a class in one image, `cirkd_region_memory` per class). Each
step samples contrast sets X_p (`cirkd_pixel_contrast` // K + 1 slots of every class's pixel queue, K
classes, one random choice of slots shared by the classes) and X_r (likewise from the region queues);
every labelled pixel v (student: through a projection head to the teacher's width, then normalised)
gets the distribution of its similarities to the contrast set:

    L_pixel  = T^2 / |V| sum_{v in V} KL( softmax(v^T X_p^T / (tau T)) || softmax(v^S X_p^T / (tau T)) )
    L_region = the same with X_r

(T = `cirkd_kd_tau`, CIRKD's `--contrast-kd-temperature` 1). Then the current batch's teacher embeddings
enter the queues: per image and present class, its region embedding at the class's write pointer (the
oldest slot), and `cirkd_enqueue_pixels` (16) of its pixel embeddings, chosen at random.

    L = L_SS (Eq. 1 of SDES) + aux_weight CE(aux) + lambda_1 L_batch + lambda_2 L_pixel + lambda_3 L_region

with lambda_1 = 1, lambda_2 = lambda_3 = 0.1 (CIRKD's Cityscapes defaults; on Pascal VOC CIRKD uses 0.01
for lambda_2 and lambda_3, winycg/CIRKD issue 8 and train_scripts/train_cirkd/voc/*.sh: set them in the
table spec's row or group options). `cirkd+kd` adds the pixel-wise KD term of `kl` (CIRKD's
`train_cirkd.py` adds `--lambda-kd 1` x `CriterionKD`, T = 1, to every CIRKD run: its table's CIRKD row is
this composite).

Reference code: winycg/CIRKD at 91735ef39d37a8a15ba942ae011e98587ac0e71d (the last commit holding the
CVPR code's `train_cirkd.py` and `train_scripts/train_cirkd/`), `losses/cirkd_mini_batch.py`
(`CriterionMiniBatchCrossImagePair`) and `losses/cirkd_memory.py` (`StudentSegContrast`), called by
`train_cirkd.py` on `s_outputs[-1]`, `t_outputs[-1]` (the feature before the classifier). The mini-batch
loss's numbers are the same at the newest commit (dab64db) below 256 x 256 feature maps.
tests/conformance/cirkd.json holds the reference's outputs. The paper's PDF was not available while this
was written: the equations above are the sections' definitions as the reference code computes them.

Choices and differences from the reference code (each with its option):
- Mini-batch scope under DDP: `cirkd_batch_scope=global` (default) relates the pixels of every image of the
  global batch (every rank's): each rank takes its own images as anchors i and every rank's as keys j, the
  student's keys gathered with their gradient (an all-gather whose backward sums the ranks' gradients), the
  teacher's without; averaged over ranks (DDP), the loss and its gradient are those of one process on the
  concatenated batch, so the number does not depend on the number of GPUs. CIRKD's code has that gather
  commented out (`#feat_S = torch.cat(GatherLayer.apply(feat_S), dim=0)` in every version), so each GPU
  relates only its own images (2 of 16 on 8 GPUs): `cirkd_batch_scope=local`. On one process both are the
  same. Cost: global computes B_rank x B pairs of A x A maps per rank (the memory grows with the global batch).
- Which pixels enter the pixel queue: `cirkd_enqueue_from=class_pixels` (default) takes
  `cirkd_enqueue_pixels` random pixels *of the class* (what a class's queue is for). The reference draws
  `randperm(n)[:K]` for the class's n pixels but then indexes the image's flat positions with it
  (`this_feat[:, perm[:K]]`, as ContrastiveSeg's code it comes from), i.e. stores random pixels among the
  image's first n positions, of any class: `cirkd_enqueue_from=first_n_positions` reproduces it. Both draw
  the same random numbers.
- Random draws come from torch's global CPU generator, in the reference's order (one `randperm(n)` per
  image and present class while enqueuing, then `randperm` of the pixel and of the region queue slots), so
  they are restored by the checkpoint, equal on every rank (every rank seeds alike and enqueues the same
  gathered batch), and the conformance test reproduces the reference's queues exactly. The contrast sets
  are drawn even when a rank holds no labelled pixel (the reference returns before drawing), so that the
  ranks' generators never drift apart.
- Order: the reference enqueues the current batch *before* sampling the contrast sets, so the sets may
  hold the batch's own embeddings; kept.
- Queues are registered float32 buffers (with their write pointers), in the checkpoint; initialised as
  the reference does, to random unit vectors (torch's global generator, when the method is built), which
  the first iterations' samples may still hold. Their size is K x (pixel + region memory) x d floats:
  19 x 22,000 x 256 x 4 B = 0.43 GB on Cityscapes with a 256-channel teacher feature, 3.4 GB at ADE20K's
  150 classes (CIRKD's defaults there too): the checkpoint carries them.
- Under DDP the enqueue gathers every rank's teacher embeddings and labels (as the reference); the
  memory terms are each rank's mean over its own labelled pixels, averaged over the ranks: the
  single-process value on the concatenated batch when the ranks hold equally many labelled pixels, and
  when the projection head's BatchNorm sees the same statistics (SyncBN, `train.sync_bn=true`, or eval mode).
- Projection head: 1x1 conv (student -> teacher channels, no bias), BatchNorm, ReLU, 1x1 conv (no bias), as
  the reference, trained with the student and never part of the deployed student; it feeds the memory
  terms only (the mini-batch term compares the raw features, whose channel counts may differ). The
  reference's SyncBatchNorm is what crashes it on one GPU or a CPU ("Default process group has not been
  initialized", winycg/CIRKD issues 18 and 30): here it is a BatchNorm2d, which `train.sync_bn=true`
  converts under DDP; every collective is skipped without a process group.
- Sizes: when the student's feature differs in size from the teacher's, it is resized (bilinear) to the
  teacher's before both terms; labels are resized (nearest) to the teacher feature's size. The reference
  requires equal sizes. `cirkd_batch_pool=k` average-pools both maps k x k (ceil mode) before the
  mini-batch term: the reference's `pooling=True` is 2 (off in train_cirkd.py, the default 1 here); its
  newest commit pools 4 x 4 whenever the map is at least 256 x 256.
- Ignored pixels (255) are no anchors of the memory terms and never enter the queues; the mini-batch term
  uses every pixel (as the reference: it reads no labels).
- Precision: embeddings, similarities and softmaxes at tau = 0.1 are computed in float32 (`full_precision`),
  whatever the autocast dtype; the queues stay float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sdesbench import IGNORE_INDEX
from sdesbench.config import rng
from sdesbench.errors import ConfigError
from sdesbench.methods.base import METHODS, MethodContext
from sdesbench.methods.features import PixelKD, feature_map, student_and_teacher_channels
from sdesbench.methods.losses import fp32, full_precision, labels_at
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions
from sdesbench.models.base import to_size

CirkdFeature = Literal["decoder_feature", "last_stage"]
BatchScope = Literal["global", "local"]  # mini-batch pairs over every rank's images | this rank's (the reference)
EnqueueFrom = Literal["class_pixels", "first_n_positions"]  # the class's pixels | the reference's positions


# ----------------------------------------------------------------------------- ranks


def process_group_active() -> bool:
    """Whether a process group of two or more ranks is running (never true on one GPU or a CPU run)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGradient(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns to each rank the sum over ranks of the gradients of
    its own slice (an all-reduce, then this rank's rows): the gradient of the sum of every rank's loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_batch(x: torch.Tensor, with_gradient: bool = False) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0 in rank order (this process's `x` without a process group);
    with `with_gradient` the gradient flows back to each rank's own slice. Ranks must hold equal shapes."""
    if not process_group_active():
        return x
    if with_gradient:
        return _GatherWithGradient.apply(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------- the losses


def pixel_embeddings(feature: torch.Tensor) -> torch.Tensor:
    """B x d x h x w -> B x A x d float32 unit vectors (L2 over channels), A = h*w."""
    return F.normalize(feature.float().flatten(2), p=2, dim=1).transpose(1, 2)


def batch_pixel_pair_loss(s_anchor: torch.Tensor, t_anchor: torch.Tensor, s_keys: torch.Tensor,
                          t_keys: torch.Tensor, tau: float) -> torch.Tensor:
    """CIRKD's mini-batch pixel-to-pixel loss: 1/(Ba Bk) sum_{i,j} 1/A sum_a KL(softmax(S^T_ij[a]/tau) ||
    softmax(S^S_ij[a]/tau)), S_ij = F_i F_j^T over anchor images i and key images j (B x A x d unit
    embeddings, `pixel_embeddings`; one process: anchors = keys = the batch). CIRKD losses/cirkd_mini_batch.py."""
    with full_precision():
        s_anchor, t_anchor, s_keys, t_keys = fp32(s_anchor, t_anchor.detach(), s_keys, t_keys.detach())
        total = s_anchor.new_zeros(())
        for i in range(s_anchor.shape[0]):
            log_p_s = F.log_softmax(torch.matmul(s_anchor[i], s_keys.transpose(1, 2)) / tau, dim=-1)  # Bk x A x A
            log_p_t = F.log_softmax(torch.matmul(t_anchor[i], t_keys.transpose(1, 2)) / tau, dim=-1)
            total = total + (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean(-1).sum()
        return total / (s_anchor.shape[0] * s_keys.shape[0])


def memory_relation_loss(s_anchor: torch.Tensor, t_anchor: torch.Tensor, contrast: torch.Tensor, tau: float,
                         kd_tau: float = 1.0) -> torch.Tensor:
    """CIRKD's memory-based pixel-to-pixel / pixel-to-region loss: kd_tau^2 / N sum_v KL(softmax(t_v X^T /
    (tau kd_tau)) || softmax(s_v X^T / (tau kd_tau))) over N anchors (N x d unit rows) against the contrast
    set X (M x d). CIRKD losses/cirkd_memory.py (`contrast_sim_kd`, batchmean)."""
    with full_precision():
        s_anchor, t_anchor, contrast = fp32(s_anchor, t_anchor.detach(), contrast.detach())
        log_p_s = F.log_softmax(s_anchor @ contrast.t() / tau / kd_tau, dim=1)
        log_p_t = F.log_softmax(t_anchor @ contrast.t() / tau / kd_tau, dim=1)
        return kd_tau ** 2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


# ----------------------------------------------------------------------------- the memory


class RelationMemory(nn.Module):
    """CIRKD's per-class queues of teacher pixel and region embeddings, their write pointers (all registered
    buffers: in the checkpoint), the enqueue and the sampling of contrast sets (module docstring)."""

    def __init__(self, num_classes: int, dim: int, pixel_memory: int, region_memory: int, enqueue_pixels: int,
                 enqueue_from: EnqueueFrom):
        super().__init__()
        self.num_classes, self.enqueue_pixels, self.enqueue_from = num_classes, enqueue_pixels, enqueue_from
        # random unit vectors until real embeddings replace them (the reference's initialisation, same draws)
        self.register_buffer("region_queue", F.normalize(torch.randn(num_classes, region_memory, dim), dim=2))
        self.register_buffer("region_ptr", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("pixel_queue", F.normalize(torch.randn(num_classes, pixel_memory, dim), dim=2))
        self.register_buffer("pixel_ptr", torch.zeros(num_classes, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Push a batch of teacher embeddings (B x d x h x w, unit vectors) with labels (B x h x w): per image
        and present class (ascending), its mean embedding (normalised) at the region pointer and
        `enqueue_pixels` random pixel embeddings at the pixel pointer (when they would reach the end, the last
        slots, and the pointer restarts at 0: the reference's rule)."""
        b, d, h, w = embeddings.shape
        k_classes, region_size, pixel_size = self.num_classes, self.region_queue.shape[1], self.pixel_queue.shape[1]
        feats = embeddings.float().flatten(2)  # B x d x N
        lab = labels.flatten(1)
        in_class = (lab >= 0) & (lab < k_classes)
        onehot = F.one_hot(torch.where(in_class, lab, 0), k_classes).to(feats.dtype) * in_class.unsqueeze(-1)
        counts = onehot.sum(1)  # B x K
        region = F.normalize(feats @ onehot / counts.clamp(min=1).unsqueeze(1), dim=1)  # B x d x K
        by_class = torch.argsort(torch.where(in_class, lab, k_classes), dim=1, stable=True)  # positions by class
        counts_cpu = counts.long().cpu()
        region_ptr, pixel_ptr = self.region_ptr.tolist(), self.pixel_ptr.tolist()
        region_writes: dict[tuple[int, int], int] = {}  # (class, slot) -> image; a later write wins, as in order
        pixel_writes: dict[tuple[int, int], tuple[int, int]] = {}  # (class, slot) -> (image, index)
        for i in range(b):
            offset = 0
            for c in range(k_classes):
                n = int(counts_cpu[i, c])
                if n == 0:
                    continue
                region_writes[(c, region_ptr[c])] = i
                region_ptr[c] = (region_ptr[c] + 1) % region_size
                chosen = torch.randperm(n)[:self.enqueue_pixels].tolist()  # global CPU generator (module docstring)
                k = len(chosen)
                start = pixel_size - k if pixel_ptr[c] + k >= pixel_size else pixel_ptr[c]
                pixel_ptr[c] = 0 if pixel_ptr[c] + k >= pixel_size else pixel_ptr[c] + k
                base = offset if self.enqueue_from == "class_pixels" else 0
                for slot, j in zip(range(start, start + k), chosen):
                    pixel_writes[(c, slot)] = (i, base + j)
                offset += n
        dev = self.region_queue.device
        if region_writes:
            (cls, slot), img = zip(*region_writes.keys()), list(region_writes.values())
            cls_t, slot_t, img_t = (torch.tensor(v, device=dev) for v in (cls, slot, img))
            self.region_queue[cls_t, slot_t] = region[img_t, :, cls_t]
        if pixel_writes:
            (cls, slot), (img, idx) = zip(*pixel_writes.keys()), zip(*pixel_writes.values())
            cls_t, slot_t, img_t, idx_t = (torch.tensor(v, device=dev) for v in (cls, slot, img, idx))
            pos = by_class[img_t, idx_t] if self.enqueue_from == "class_pixels" else idx_t
            self.pixel_queue[cls_t, slot_t] = F.normalize(feats[img_t, :, pos], dim=1)
        self.region_ptr.copy_(torch.tensor(region_ptr))
        self.pixel_ptr.copy_(torch.tensor(pixel_ptr))

    @staticmethod
    def sample(queue: torch.Tensor, per_class: int) -> torch.Tensor:
        """The contrast set: the same `per_class` random slots of every class's queue, class by class
        ((K * per_class) x d; the reference's `_sample_negative`, one randperm of the slots)."""
        slots = torch.randperm(queue.shape[1])[:per_class].to(queue.device)
        return queue[:, slots].reshape(-1, queue.shape[2])


# ----------------------------------------------------------------------------- the method


def projection_head(in_channels: int, out_channels: int) -> nn.Sequential:
    """CIRKD's projection head: 1x1 conv (no bias), BatchNorm, ReLU, 1x1 conv (no bias) (module docstring)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
                         nn.ReLU(True), nn.Conv2d(out_channels, out_channels, 1, bias=False))


@dataclass
class CIRKDOptions:
    cirkd_batch_weight: float = field(default=1.0, metadata=rng(0.0, doc="lambda of the mini-batch pixel-to-pixel term"))
    cirkd_pixel_weight: float = field(default=0.1, metadata=rng(0.0, doc="lambda of the memory pixel-to-pixel term (VOC: 0.01)"))
    cirkd_region_weight: float = field(default=0.1, metadata=rng(0.0, doc="lambda of the memory pixel-to-region term (VOC: 0.01)"))
    cirkd_tau: float = field(default=0.1, metadata=rng(1e-3, doc="temperature of the similarity distributions"))
    cirkd_kd_tau: float = field(default=1.0, metadata=rng(1e-3, doc="KD temperature of the memory terms (x tau; loss x T^2)"))
    cirkd_pixel_memory: int = field(default=20000, metadata=rng(1, doc="pixel queue length per class"))
    cirkd_region_memory: int = field(default=2000, metadata=rng(1, doc="region queue length per class"))
    cirkd_pixel_contrast: int = field(default=4096, metadata=rng(0, doc="pixel embeddings sampled per step (//classes + 1 per class)"))
    cirkd_region_contrast: int = field(default=1024, metadata=rng(0, doc="region embeddings sampled per step (//classes + 1 per class)"))
    cirkd_enqueue_pixels: int = field(default=16, metadata=rng(1, doc="pixels of each class and image entering the queue"))
    cirkd_enqueue_from: EnqueueFrom = "class_pixels"
    cirkd_batch_scope: BatchScope = "global"
    cirkd_batch_pool: int = field(default=1, metadata=rng(1, doc="k x k average pooling before the mini-batch term"))
    cirkd_on: CirkdFeature = "decoder_feature"


class CIRKDTerms(nn.Module):
    """The three CIRKD terms with the projection head and the memory; shared by `cirkd` and `cirkd+kd`."""

    def __init__(self, opts: CIRKDOptions, ctx: MethodContext):
        super().__init__()
        self.opts = opts
        s_ch, t_ch = student_and_teacher_channels(ctx, opts.cirkd_on)
        self.projection = projection_head(s_ch, t_ch)
        self.memory = RelationMemory(ctx.num_classes, t_ch, opts.cirkd_pixel_memory, opts.cirkd_region_memory,
                                     opts.cirkd_enqueue_pixels, opts.cirkd_enqueue_from)
        self.pixel_per_class = opts.cirkd_pixel_contrast // ctx.num_classes + 1  # train_cirkd.py's split
        self.region_per_class = opts.cirkd_region_contrast // ctx.num_classes + 1

    def batch_term(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        o = self.opts
        if o.cirkd_batch_pool > 1:
            s = F.avg_pool2d(s, o.cirkd_batch_pool, o.cirkd_batch_pool, ceil_mode=True)
            t = F.avg_pool2d(t, o.cirkd_batch_pool, o.cirkd_batch_pool, ceil_mode=True)
        with full_precision():
            s_emb, t_emb = pixel_embeddings(s), pixel_embeddings(t.detach())
            if o.cirkd_batch_scope == "global":
                return batch_pixel_pair_loss(s_emb, t_emb, gather_batch(s_emb, with_gradient=True),
                                             gather_batch(t_emb), o.cirkd_tau)
            return batch_pixel_pair_loss(s_emb, t_emb, s_emb, t_emb, o.cirkd_tau)

    def memory_terms(self, s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.opts
        projected = self.projection(s)
        with full_precision():
            s_emb = F.normalize(fp32(projected), p=2, dim=1)
            t_emb = F.normalize(fp32(t.detach()), p=2, dim=1)
            labels = labels_at(labels, t_emb.shape[-2:])
            self.memory.enqueue(gather_batch(t_emb), gather_batch(labels))
            pixel_set = self.memory.sample(self.memory.pixel_queue, self.pixel_per_class)
            region_set = self.memory.sample(self.memory.region_queue, self.region_per_class)
            valid = (labels != IGNORE_INDEX).flatten()
            if not bool(valid.any()):
                zero = projected.float().sum() * 0.0  # keeps the projection in the graph (DDP)
                return zero, zero
            s_anchor = s_emb.permute(0, 2, 3, 1).reshape(-1, s_emb.shape[1])[valid]
            t_anchor = t_emb.permute(0, 2, 3, 1).reshape(-1, t_emb.shape[1])[valid]
            return (memory_relation_loss(s_anchor, t_anchor, pixel_set, o.cirkd_tau, o.cirkd_kd_tau),
                    memory_relation_loss(s_anchor, t_anchor, region_set, o.cirkd_tau, o.cirkd_kd_tau))

    def forward(self, student_out: dict[str, Any], teacher_out: dict[str, Any],
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        o = self.opts
        t = feature_map(teacher_out, o.cirkd_on).detach()
        s = to_size(feature_map(student_out, o.cirkd_on), t.shape[-2:])
        pixel, region = self.memory_terms(s, t, labels)
        return {"cirkd_batch": o.cirkd_batch_weight * self.batch_term(s, t),
                "cirkd_pixel": o.cirkd_pixel_weight * pixel, "cirkd_region": o.cirkd_region_weight * region}


def check_cirkd_options(opts: CIRKDOptions) -> None:
    if opts.cirkd_enqueue_pixels > opts.cirkd_pixel_memory:
        raise ConfigError(f"method.cirkd_enqueue_pixels={opts.cirkd_enqueue_pixels} exceeds "
                          f"method.cirkd_pixel_memory={opts.cirkd_pixel_memory} (a class's pixels of one image "
                          "must fit in its queue)")


@METHODS.register("cirkd")
class CIRKD(TeacherStudentMethod):
    """L = L_SS (Eq. 1) + l1 L_batch + l2 L_pixel + l3 L_region (Yang et al. 2022); see the module docstring."""
    logged_terms = ("ss", "cirkd_batch", "cirkd_pixel", "cirkd_region")
    conformance = "cirkd.json"
    option_prefix = "cirkd_"

    @dataclass
    class Options(CIRKDOptions, TeacherStudentOptions):
        pass

    @classmethod
    def check_options(cls, opts, num_classes):
        check_cirkd_options(opts)

    def __init__(self, options, ctx: MethodContext):
        super().__init__(options, ctx)
        self.cirkd = CIRKDTerms(options, ctx)

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        return {**self.task_terms(student_out, labels), **self.cirkd(student_out, teacher_out, labels)}


@METHODS.register("cirkd+kd")
class CIRKDKD(PixelKD, CIRKD):
    """CIRKD + the pixel-wise KD term of `kl` (CIRKD's train_cirkd.py, the table's CIRKD row)."""
    logged_terms = ("ss", "cirkd_batch", "cirkd_pixel", "cirkd_region", "kd")
    conformance = "cirkd.json"
    option_prefix = "cirkd_"
