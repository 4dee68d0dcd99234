"""`rdd`, `rdd+kl`, `rdd+cwd`: relative difficulty distillation (Liang, Sun, Du, Chen & Huang,
"Relative difficulty distillation for semantic segmentation", Sci. China Inf. Sci. 2024;
public code github.com/sunyueue/RDD, `train_onlykd_two_stage_diff.py`).

RDD adds no distillation objective: the teacher only decides *which pixels* the student's
cross-entropy (Eq. 1) learns from, in two consecutive stages of training.

Stage 1, teacher-full evaluated RDD (TFE-RDD), the first `tfe_fraction` of the iterations:
each labelled pixel's CE is weighted by the teacher's confidence in it,

    L_TFE = 1/|V| * sum_{i in V} w_i * CE(z^S_i, y_i),     w_i = exp(-d_i)  (no gradient)

where d_i is the teacher's difficulty of pixel i. The public code uses the disagreement of
the teacher's two heads, d_i = KL(p^T_aux,i || p^T_main,i) (`tfe_difficulty=aux_kl`, which
needs a teacher trained with `model.aux=true`). Our teachers usually have no auxiliary head,
so `tfe_difficulty=auto` (default) uses aux_kl when the teacher has an aux head and otherwise
the **teacher's predictive entropy**, d_i = H(p^T_i) = -sum_c p^T_ic log p^T_ic
(`entropy`): like the head disagreement it measures how uncertain the teacher is about pixel i
from the teacher alone ("teacher-full evaluated": no label, no student), it is 0 for a one-hot
prediction (w = 1) and largest for a uniform one (w = 1/C). `true_prob` (w_i = p^T_i(y_i), i.e.
d_i = the teacher's own CE) is the label-aware alternative.

Stage 2, teacher-student evaluated RDD (TSE-RDD), the remaining iterations: a pixel is hard
for a network when it is labelled and its probability of the true class is at most the OHEM
threshold t = max(ohem_thresh, the k-th smallest true-class probability in the batch),
k = ohem_min_kept * |V| (OHEM as in the public `OhemCrossEntropy2d.get_mask`). The student
learns from the pixels hard for exactly one of teacher and student,

    M = H^S xor H^T,     L_TSE = 1/|M| * sum_{i in M} CE(z^S_i, y_i)    (0 when M is empty)

(`tse_combine=xor`; the public code's or / and / student-only OHEM variants are options).

`rdd+kl` adds the Hinton KD term of `kl` (the public script's `CriterionKD`, T = 1, weight 1),
`rdd+cwd` the CWD term of `cwd`; both through every stage, with their own options
(`kd_*`, `cwd_*`).

Choices and differences from the public code:
- Reductions: the stage-1 weighted CE is averaged over the labelled pixels (the suite's
  convention; the public code averages over all pixels, ignored ones counting 0); stage 2
  averages over M (as the public code's CE with ignore index).
- No dataset constants: the public code's Cityscapes class weights in the OHEM CE and its fixed
  min_kept = 100000 pixels (and a 512x1024 resize of the weight map) are not used; min_kept is
  a fraction of the labelled pixels (0.1 is about 100000 of two 512x1024 crops).
- Everything at input resolution (the suite's logits); the public weight map is computed at
  1/8 resolution and upsampled.
- tfe_fraction = 0.2: the public default `--warmup_iter 8000` of 40000 iterations (its Table-5
  script uses 4000 of 40000 = 0.1).
- The student's aux head, when present, gets the same stage loss times `aux_weight` (public:
  stage 1 weights CE_main + 0.4 CE_aux; stage 2 masks the aux head with the teacher's aux
  head, here with the teacher's main head when the teacher has no aux head).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from sdesbench.config import rng
from sdesbench.errors import ConfigError
from sdesbench.methods.base import METHODS, MethodContext, StepInfo
from sdesbench.methods.cwd import CWDOptions, CWDTerm
from sdesbench.methods.features import PixelKD
from sdesbench.methods.losses import class_kl_map
from sdesbench.methods.losses import valid_mask
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions

Difficulty = Literal["aux_kl", "entropy", "true_prob"]  # TFE-RDD's per-pixel difficulty (module docstring)
TseCombine = Literal["xor", "or", "and", "student"]  # TSE-RDD: which hard pixels the student learns from


def true_class_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p_i(y_i): B x C x H x W, B x H x W -> B x H x W (ignored pixels read class 0; mask them)."""
    idx = torch.where(valid_mask(labels), labels, torch.zeros_like(labels)).unsqueeze(1)
    return F.softmax(logits.float(), dim=1).gather(1, idx).squeeze(1)


def tfe_pixel_weights(teacher_logits: torch.Tensor, teacher_aux: torch.Tensor | None, labels: torch.Tensor,
                      difficulty: Difficulty = "entropy") -> torch.Tensor:
    """TFE-RDD weights w_i = exp(-d_i) (B x H x W, no gradient); d_i per `difficulty` (module docstring).
    `aux_kl` needs the teacher's aux logits (RDD checks that the teacher has an aux head when built)."""
    with torch.no_grad():
        if difficulty == "aux_kl":
            if teacher_aux is None:
                raise ValueError("difficulty 'aux_kl' needs the teacher's aux head logits")
            return torch.exp(-class_kl_map(teacher_aux, teacher_logits))
        if difficulty == "entropy":
            log_p = F.log_softmax(teacher_logits.float(), dim=1)
            return torch.exp((log_p.exp() * log_p).sum(1))
        return true_class_prob(teacher_logits, labels)


def tfe_weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_TFE = 1/|V| sum_{i in V} w_i CE_i (0 when no pixel is labelled)."""
    valid = valid_mask(labels)
    if not bool(valid.any()):
        return logits.sum() * 0.0 + 0.0  # + 0.0 turns -0.0 into 0.0 in the logs
    ce = F.cross_entropy(logits.float(), torch.where(valid, labels, torch.zeros_like(labels)), reduction="none")
    return (weights * ce)[valid].mean()


def ohem_hard_mask(logits: torch.Tensor, labels: torch.Tensor, thresh: float, min_kept: float) -> torch.Tensor:
    """Labelled pixels whose true-class probability is <= max(thresh, k-th smallest), k = min_kept * |V|."""
    valid = valid_mask(labels)
    n = int(valid.sum())
    if n == 0:
        return valid
    prob = true_class_prob(logits.detach(), labels)
    threshold = thresh
    k = min(int(min_kept * n), n)
    if k > 0:
        kth = float(prob[valid].kthvalue(k).values)
        threshold = max(threshold, kth)
    return valid & (prob <= threshold)


def tse_pixel_mask(student_hard: torch.Tensor, teacher_hard: torch.Tensor, combine: TseCombine = "xor") -> torch.Tensor:
    """TSE-RDD: the pixels the student learns from (xor: hard for exactly one of the two networks)."""
    if combine == "xor":
        return student_hard ^ teacher_hard
    if combine == "or":
        return student_hard | teacher_hard
    if combine == "and":
        return student_hard & teacher_hard
    return student_hard  # "student": the student's own hard pixels (plain OHEM)


def tse_masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_TSE = 1/|M| sum_{i in M} CE_i (0 when M is empty)."""
    if not bool(mask.any()):
        return logits.sum() * 0.0 + 0.0  # + 0.0 turns -0.0 into 0.0 in the logs
    ce = F.cross_entropy(logits.float(), torch.where(mask, labels, torch.zeros_like(labels)), reduction="none")
    return ce[mask].mean()


@dataclass
class RDDOptions:
    tfe_fraction: float = field(default=0.2, metadata=rng(0.0, 1.0, doc="fraction of iterations in stage 1 (TFE)"))
    tfe_difficulty: Literal["auto", "aux_kl", "entropy", "true_prob"] = "auto"  # auto: aux_kl with a teacher aux head
    ohem_thresh: float = field(default=0.7, metadata=rng(0.0, 1.0, doc="OHEM true-class probability threshold"))
    ohem_min_kept: float = field(default=0.1, metadata=rng(0.0, 1.0, doc="OHEM keeps at least this fraction"))
    tse_combine: TseCombine = "xor"


@METHODS.register("rdd")
class RDD(TeacherStudentMethod):
    """Relative difficulty distillation: TFE-RDD then TSE-RDD pixel selection of the CE; see the module docstring."""
    logged_terms = ("ss_tfe", "ss_tse")
    conformance = "rdd.json"
    option_prefix = ""

    @dataclass
    class Options(RDDOptions, TeacherStudentOptions):
        pass

    def __init__(self, options, ctx: MethodContext):
        super().__init__(options, ctx)
        teacher = ctx.teacher
        if options.tfe_difficulty == "aux_kl" and teacher is not None and getattr(teacher, "aux_head", None) is None:
            raise ConfigError("method.tfe_difficulty=aux_kl needs a teacher with an aux head "
                              "(train it with model.aux=true), or use tfe_difficulty=entropy")

    def in_tfe_stage(self, step: StepInfo) -> bool:
        return step.iteration < round(self.opts.tfe_fraction * step.total_iters)

    def rdd_terms(self, student_out: dict[str, Any], labels: torch.Tensor, step: StepInfo,
                  teacher_out: dict[str, Any]) -> dict[str, torch.Tensor]:
        o = self.opts
        heads = [("ss", student_out["logits"], teacher_out["logits"])]
        if student_out.get("aux") is not None:
            t_aux = teacher_out.get("aux")
            heads.append(("aux", student_out["aux"], t_aux if t_aux is not None else teacher_out["logits"]))
        terms = {}
        if self.in_tfe_stage(step):
            difficulty = o.tfe_difficulty
            if difficulty == "auto":
                difficulty = "aux_kl" if teacher_out.get("aux") is not None else "entropy"
            w = tfe_pixel_weights(teacher_out["logits"], teacher_out.get("aux"), labels, difficulty)
            for name, s_logits, _ in heads:
                terms[f"{name}_tfe"] = tfe_weighted_ce(s_logits, labels, w)
        else:
            for name, s_logits, t_logits in heads:
                mask = tse_pixel_mask(ohem_hard_mask(s_logits, labels, o.ohem_thresh, o.ohem_min_kept),
                                      ohem_hard_mask(t_logits, labels, o.ohem_thresh, o.ohem_min_kept), o.tse_combine)
                terms[f"{name}_tse"] = tse_masked_ce(s_logits, labels, mask)
        for key in [k for k in terms if k.startswith("aux_")]:
            terms[key] = o.aux_weight * terms[key]
        return terms

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        return self.rdd_terms(student_out, labels, step, self.require_teacher(teacher_out))


@METHODS.register("rdd+kl")
class RDDKL(PixelKD, RDD):
    """RDD (TFE then TSE) + the Hinton KD term of `kl` at every iteration (the public RDD script)."""
    logged_terms = ("ss_tfe", "ss_tse", "kd")
    conformance = None
    no_conformance_because = "the sum of rdd and kl, each checked against its reference"
    option_prefix = ""


@METHODS.register("rdd+cwd")
class RDDCWD(RDD):
    """RDD (TFE then TSE) + the channel-wise distillation term of `cwd` at every iteration."""
    logged_terms = ("ss_tfe", "ss_tse", "cwd")
    conformance = None
    no_conformance_because = "the sum of rdd and cwd, each checked against its reference"
    option_prefix = ""

    @dataclass
    class Options(CWDOptions, RDDOptions, TeacherStudentOptions):
        pass

    def __init__(self, options, ctx: MethodContext):
        super().__init__(options, ctx)
        self.cwd = CWDTerm(options, ctx)

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        terms = super().loss_terms(student_out, labels, step, teacher_out)
        terms["cwd"] = self.cwd(student_out, teacher_out)
        return terms
