"""`dsd`: double similarity distillation (Feng et al., "Double Similarity Distillation for Semantic
Image Segmentation", IEEE TIP 2021), the DSD row of CIRKD's table.

Two terms, computed as CIRKD's `losses/dsd.py` does (the reference; its equations below):

- PSD, pixel-wise similarity through residual attention maps. For each map f_k of a list (CIRKD:
  aux logits, feature before the classifier, logits), its attention map in the attention-transfer form
  a_k = vec(mean_c f_k^2) / ||vec(mean_c f_k^2)||_2 (B x N); for each pair n < m the residual map
  r_nm = (a_m - a_n) / ||a_m - a_n||_2; then, over the K pairs,

      L_PSD = 1/K sum_(n,m) mean_{b,i} (r^S_nm - r^T_nm)_bi^2

- CSD, category-wise similarity through the Gram matrix of the logits z (B x C x h x w): 2x2 average
  pooling (stride 2, ceil mode), each class channel softened into a distribution over the pooled
  positions, q_bc = softmax_positions(z_bc / tau), and G_b = q_b q_b^T (C x C, one entry per pair of
  categories); then

      L_CSD = 1/(B*C*C) sum_b ||G^S_b - G^T_b||_F^2

and L = L_SS (Eq. 1 of SDES) + aux_weight * CE(aux) + dsd_psd_weight * L_PSD + dsd_csd_weight * L_CSD.

Reference code: winycg/CIRKD `losses/dsd.py` (`CriterionDoubleSimKD` = `CriterionPSD` + `CriterionCSD`),
called by `train_kd.py` with `[s_outputs[-2], s_outputs[-1], s_outputs[0]]` (aux logits, feature before
the classifier, logits, all at the decoder's 1/8 resolution) and the teacher's, weights `--lambda-psd 1000
--lambda-csd 10` (scripts/train_kd/train_dsd.sh). tests/conformance/dsd.json holds its outputs. The
paper (whose abstract announces its code; none was used here) describes PSD as residual attention maps
of adjacent layers with an L2 loss and CSD as a correlation matrix of temperature-softened logits; its
full text was not available while writing this, so this implementation was checked against CIRKD's
code, not against the paper's equations.

Choices (what is computed and the alternative):
- Maps of PSD: aux logits, decoder feature, logits when both student and teacher have an aux output
  (`dsd_maps=auto`, CIRKD's list), else decoder feature and logits (one pair). `aux_feature_logits`
  requires aux outputs on both sides (one-line error otherwise; train with `model.aux=true`);
  `feature_logits` never uses them.
- Pairs: every pair n < m (`dsd_pairs=all`, CIRKD: with three maps (aux, feature), (aux, logits),
  (feature, logits)); `adjacent` keeps consecutive maps only, as the paper's "adjacent layers".
- Resolution: CIRKD compares everything on the 1/8 grid where its maps live; the suite's logits are at
  input size (the model contract). By default (`dsd_size=feature`) both terms work on the student's
  `decoder_feature` grid: each attention map is computed on its own map and resized (bilinear) to that
  grid (as `at` resizes attention maps), and CSD's logits are resized to it before the pooling. This
  matters for CSD: a softmax over positions has entries of order 1/positions, so G and L_CSD shrink
  with the resolution, and CIRKD's weight 10 belongs to the 1/8 grid. `dsd_size=input` uses the input
  size instead (the feature's attention map upsampled).
- CSD temperature 4 (`dsd_csd_tau`, CIRKD's `self.tau = 4.`); no tau^2 factor (CIRKD has none).
- PSD normalises r twice in CIRKD (`F.normalize` of an already normalised map): the same map, once here.
- Teacher and student may have different channel counts (attention maps average channels; CSD reads
  class channels only). The teacher's maps are detached targets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from sdesbench.config import rng
from sdesbench.errors import SdesbenchError
from sdesbench.methods.at import spatial_attention
from sdesbench.methods.base import METHODS
from sdesbench.methods.losses import fp32, full_precision
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions
from sdesbench.models.base import to_size

PsdMaps = Literal["auto", "aux_feature_logits", "feature_logits"]
PsdPairs = Literal["all", "adjacent"]
DsdSize = Literal["feature", "input"]  # the student's decoder_feature grid | its logits' (input) size


def map_pairs(count: int, pairs: PsdPairs = "all") -> list[tuple[int, int]]:
    """Index pairs (n, m), n < m, of the residual maps: all of them (CIRKD) or consecutive ones."""
    if pairs == "adjacent":
        return [(n, n + 1) for n in range(count - 1)]
    return [(n, m) for n in range(count - 1) for m in range(n + 1, count)]


def residual_attention_maps(maps: list[torch.Tensor], size, pairs: PsdPairs = "all") -> list[torch.Tensor]:
    """PSD's r_nm = normalize(a_m - a_n), a_k = normalize(vec(mean_c f_k^2)) resized to `size` (B x N each)."""
    attention = [F.normalize(to_size(spatial_attention(f), size).flatten(1), dim=1) for f in maps]
    return [F.normalize(attention[m] - attention[n], dim=1) for n, m in map_pairs(len(maps), pairs)]


def psd_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], size,
             pairs: PsdPairs = "all") -> torch.Tensor:
    """L_PSD = 1/K sum over the K pairs of mean_{b,i} (r^S - r^T)^2 (CIRKD `CriterionPSD`)."""
    with full_precision():
        r_s = residual_attention_maps([fp32(f) for f in student_maps], size, pairs)
        r_t = residual_attention_maps([fp32(f.detach()) for f in teacher_maps], size, pairs)
        return sum((s - t).pow(2).mean() for s, t in zip(r_s, r_t)) / len(r_s)


def category_similarity(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """CSD's G = q q^T, q_c = softmax over the 2x2-average-pooled positions of z_c / tau: B x C x C."""
    pooled = F.avg_pool2d(logits, kernel_size=2, stride=2, ceil_mode=True)
    q = F.softmax(pooled.flatten(2) / tau, dim=2)
    return q @ q.transpose(1, 2)


def csd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """L_CSD = mean over B x C x C of (G^S - G^T)^2 (CIRKD `CriterionCSD`)."""
    with full_precision():
        s, t = fp32(student_logits, teacher_logits.detach())
        return (category_similarity(s, tau) - category_similarity(t, tau)).pow(2).mean()


@METHODS.register("dsd")
class DSD(TeacherStudentMethod):
    """L = L_SS (Eq. 1) + dsd_psd_weight * L_PSD + dsd_csd_weight * L_CSD (CIRKD losses/dsd.py); module docstring."""
    logged_terms = ("ss", "psd", "csd")
    conformance = "dsd.json"
    option_prefix = "dsd_"

    @dataclass
    class Options(TeacherStudentOptions):
        dsd_psd_weight: float = field(default=1000.0, metadata=rng(0.0, doc="weight of L_PSD (CIRKD: 1000)"))
        dsd_csd_weight: float = field(default=10.0, metadata=rng(0.0, doc="weight of L_CSD (CIRKD: 10)"))
        dsd_csd_tau: float = field(default=4.0, metadata=rng(1e-3, doc="temperature of CSD's spatial softmax"))
        dsd_maps: PsdMaps = "auto"
        dsd_pairs: PsdPairs = "all"
        dsd_size: DsdSize = "feature"

    def psd_maps(self, student_out: dict[str, Any], teacher_out: dict[str, Any]) -> tuple[list, list]:
        keys = ["decoder_feature", "logits"]
        both_aux = student_out.get("aux") is not None and teacher_out.get("aux") is not None
        if self.opts.dsd_maps == "aux_feature_logits" and not both_aux:
            raise SdesbenchError("method.dsd_maps=aux_feature_logits needs aux outputs from the student and the "
                                 "teacher (train both with model.aux=true)")
        if self.opts.dsd_maps == "aux_feature_logits" or (self.opts.dsd_maps == "auto" and both_aux):
            keys = ["aux", *keys]
        return [student_out[k] for k in keys], [teacher_out[k] for k in keys]

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        terms = self.task_terms(student_out, labels)
        grid = student_out["decoder_feature"] if self.opts.dsd_size == "feature" else student_out["logits"]
        size = grid.shape[-2:]
        s_maps, t_maps = self.psd_maps(student_out, teacher_out)
        terms["psd"] = self.opts.dsd_psd_weight * psd_loss(s_maps, t_maps, size, self.opts.dsd_pairs)
        s_logits, t_logits = to_size(student_out["logits"], size), to_size(teacher_out["logits"], size)
        terms["csd"] = self.opts.dsd_csd_weight * csd_loss(s_logits, t_logits, self.opts.dsd_csd_tau)
        return terms
