"""`skd`: structured knowledge distillation (Liu et al., "Structured Knowledge Distillation for Semantic
Segmentation", CVPR 2019; "Structured Knowledge Distillation for Dense Prediction", TPAMI 2020), the SKD row
of CIRKD's table: pixel-wise, pair-wise and holistic distillation.

    L = L_SS (Eq. 1 of SDES) + aux_weight * CE(aux) + kd_weight * l_pi + skd_weight * l_pa + adv_weight * L_adv

- Pixel-wise (Liu et al. Sec. 3.1): l_pi = 1/|P| sum_i KL(q^t_i || q^s_i) on the class distributions,
  the `kl` term (options `kd_*`; the paper writes 1/(W' H') sum_i KL(q^s_i || q^t_i), both codes compute
  the teacher-first form).
- Pair-wise (Sec. 3.2): the feature map is pooled into nodes (max pooling over beta x beta patches), and
  the student learns the teacher's node-to-node cosine similarities over the fully connected graph:

      a_ij = f_i^T f_j / (||f_i|| ||f_j||),   l_pa = 1/(B N^2) sum_b sum_{i,j} (a^s_bij - a^t_bij)^2

  (`pairwise_distillation_loss`; N nodes).
- Holistic (Sec. 3.3): the adversarial term and the discriminator's own update, `adversarial.py`
  (options `adv_*`; logged as `adv` and, for D, `adv_d`).

Reference code: winycg/CIRKD `losses/skd.py` (`CriterionStructuralKD`), `losses/kd.py`, `losses/adv.py`,
`utils/sagan.py`, called by `train_kd.py` with `scripts/train_kd/train_skd.sh` (`--lambda-kd 1 --lambda-skd 10
--lambda-adv 0.001 --lambda-d 0.1`); the authors' irfanICMLL/structure_knowledge_distillation
`utils/criterion.py` (`CriterionPairWiseforWholeFeatAfterPool`, `CriterionPixelWise`), `utils/utils.py`
(`sim_dis_compute`), `networks/kd_model.py`, `run_train_val.sh`. tests/conformance/skd.json holds their outputs.

Choices (the defaults are CIRKD's SKD row; each alternative is an option):
- Feature: the one before the classifier (`skd_on=decoder_feature`: CIRKD's `x_feat_after_aspp`, the
  authors' `x_feat_after_psp`); `last_stage` is the encoder's last stage. Widths may differ (the graph is
  N x N); a student feature of another size is resized (bilinear) to the teacher's before pooling.
- Nodes: 2x2 patches (`skd_pool=2`, CIRKD: `MaxPool2d(2, 2, ceil_mode=True)`); the authors' code pools
  patches of a fraction of the map (`pool_scale 0.5`: about 2x2 to 3x3 nodes for the whole map;
  `skd_pool_scale=0.5`, which then overrides `skd_pool`).
- Normalisation: `F.normalize` (CIRKD, gradient through the norm; `skd_norm=normalize`); the authors
  divide by the detached norm + 1e-8 (`skd_norm=detached`).
- Reduction: the mean over B N^2 pairs, as both codes (the authors write it as a sum / N^2 / B).
- Weights: kd 1, pair-wise 10, adversarial 0.001 / D 0.1 (CIRKD). The authors' `run_train_val.sh`: lambda_pi
  10 on a pixel-wise term summed over the batch (B times ours; their soft cross-entropy adds the teacher's
  entropy, a constant), lambda_pa 0.5 (`options.py` default 1), lambda_d 0.1 on both adversarial sides
  with WGAN-GP (`adv_loss=wgan-gp adv_weight=0.1 adv_d_optimizer=sgd adv_d_schedule=poly`).
- Pixel-wise reduction: the mean over labelled pixels (`kd_valid_only=true`, the suite's convention;
  CIRKD's `batchmean` over all pixels: `kd_valid_only=false`), on the input-size logits (both codes: 1/8).
- Under mixed precision the similarities are computed in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from sdesbench.config import rng
from sdesbench.methods.adversarial import AdversarialOptions, KDAdversarialMethod
from sdesbench.methods.base import METHODS
from sdesbench.methods.features import feature_map
from sdesbench.methods.kl import KLOptions
from sdesbench.methods.losses import fp32, full_precision
from sdesbench.methods.teacher_student import TeacherStudentOptions
from sdesbench.models.base import to_size

SkdFeature = Literal["decoder_feature", "last_stage"]
SkdNorm = Literal["normalize", "detached"]


def node_patch(size: tuple[int, int], pool: int, pool_scale: float) -> tuple[int, int]:
    """The beta x beta patch each graph node pools: `pool` a side, or (pool_scale > 0) that fraction of
    the map's side, as the authors' `int(size * scale)` (at least 1)."""
    if pool_scale > 0:
        return tuple(max(1, int(s * pool_scale)) for s in size)  # type: ignore[return-value]
    return pool, pool


def pairwise_similarity(feature: torch.Tensor, detach_norm: bool = False) -> torch.Tensor:
    """a_ij = cos(f_i, f_j) between the positions of B x C x h x w -> B x N x N (Liu et al. Sec. 3.2);
    `detach_norm`: divide by the detached norm + 1e-8, as the authors' `similarity`."""
    f = feature.flatten(2)
    if detach_norm:
        f = f / (f.norm(dim=1, keepdim=True).detach() + 1e-8)
    else:
        f = F.normalize(f, dim=1)
    return f.transpose(1, 2) @ f


def pairwise_distillation_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, pool: int = 2,
                               pool_scale: float = 0.0, detach_norm: bool = False) -> torch.Tensor:
    """l_pa = mean over b, i, j of (a^s_bij - a^t_bij)^2 on max-pooled nodes (Liu et al. Sec. 3.2; CIRKD
    `CriterionStructuralKD`, the authors' `sim_dis_compute`). The student's feature is resized to the teacher's."""
    with full_precision():
        s, t = fp32(student_feature, teacher_feature.detach())
        s = to_size(s, t.shape[-2:])
        patch = node_patch(tuple(t.shape[-2:]), pool, pool_scale)
        s, t = (F.max_pool2d(x, patch, patch, ceil_mode=True) for x in (s, t))
        return (pairwise_similarity(s, detach_norm) - pairwise_similarity(t, detach_norm)).pow(2).mean()


@dataclass
class SKDOptions:
    skd_weight: float = field(default=10.0, metadata=rng(0.0, doc="weight of the pair-wise term "
                                                                  "(CIRKD --lambda-skd 10; authors 0.5)"))
    skd_on: SkdFeature = "decoder_feature"
    skd_pool: int = field(default=2, metadata=rng(1, 64, doc="node patch side (CIRKD: 2)"))
    skd_pool_scale: float = field(default=0.0, metadata=rng(0.0, 1.0, doc="node patch as a fraction of the map "
                                                                          "(authors: 0.5); 0: use skd_pool"))
    skd_norm: SkdNorm = "normalize"  # detached: the authors' norm (detached, + 1e-8)


@METHODS.register("skd")
class SKD(KDAdversarialMethod):
    """Pixel-wise KD + pair-wise similarity of pooled features + holistic adversarial term (Liu et al.
    2019/2020), CIRKD's SKD row by default; see the module docstring."""
    logged_terms = ("ss", "pair", "kd", "adv", "adv_d")
    conformance = "skd.json"
    option_prefix = "skd_"

    @dataclass
    class Options(SKDOptions, KLOptions, AdversarialOptions, TeacherStudentOptions):
        pass

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        o = self.opts
        terms = self.task_terms(student_out, labels)
        terms["pair"] = o.skd_weight * pairwise_distillation_loss(
            feature_map(student_out, o.skd_on), feature_map(teacher_out, o.skd_on), o.skd_pool, o.skd_pool_scale,
            o.skd_norm == "detached")
        terms.update(self.kd_and_adversarial_terms(student_out, labels, teacher_out))
        return terms
