"""The holistic adversarial term of structured knowledge distillation (Liu et al., "Structured Knowledge
Distillation for Semantic Segmentation", CVPR 2019; "... for Dense Prediction", TPAMI 2020, Sec. 3.3),
as a reusable piece: the score-map discriminator, its losses as pure functions, and `HolisticAdversary`,
the module that keeps what the discriminator's own update needs and builds that update's optimizer.
`KDAdversarialMethod` is the base of every method that adds CIRKD's pixel KD and adversarial terms to its
own loss (`skd`, `ifvd+kd+adv`, `cwd+kd+adv`). Registers no method.

The paper (Sec. 3.3) trains a discriminator D to tell the teacher's score maps Q^t from the student's
Q^s and the student to fool it, with the Wasserstein distance

    l_ho(S, D) = E_{Q^s}[D(Q^s)] - E_{Q^t}[D(Q^t)]

(D a critic whose score map is averaged over its positions and the batch), D trained with a gradient penalty
(WGAN-GP) and the student's loss carrying -lambda_2 l_ho. The code computes, per batch:

    student (generator):    L_adv  = -mean D(Q^s)                                         (both losses)
    D, hinge (CIRKD):       L_D    = mean relu(1 - D(Q^t)) + mean relu(1 + D(Q^s))
    D, WGAN-GP (authors):   L_D    = -mean D(Q^t) + mean D(Q^s) + lambda_gp * mean_b (||grad D(Q^)||_2 - 1)^2,
                            Q^ = a Q^t + (1 - a) Q^s,  a ~ U(0, 1) per image

Reference code: winycg/CIRKD `losses/adv.py` (`CriterionAdvForG`, `CriterionAdv`, `CriterionAdditionalGP`),
`utils/sagan.py` (`Discriminator`), `train_kd.py` (how they are called); irfanICMLL/
structure_knowledge_distillation `networks/sagan_models.py`, `utils/criterion.py`, `networks/kd_model.py`.

What is computed (each choice the other way is an option, `AdversarialOptions`):
- D is CIRKD's SAGAN discriminator: BatchNorm on the score map (`adv_preprocess=bn`; `tanh` is the
  codes' other mode), four 4x4 stride-2 convolutions (64, 128, 256, 512 channels, spectral norm with one
  power iteration per call, LeakyReLU 0.1), self-attention after the third and the fourth, a 4x4 valid
  convolution to one channel. The paper conditions D on the image (D(Q|I)); neither code does, nor does this.
- Spectral norm: torch's `nn.utils.spectral_norm` (`adv_spectral_norm=per_call`): one power iteration per
  call, v then u as the SAGAN code (torch's newer parametrisation updates u first), and each call's sigma
  differentiated with that call's vectors (Miyato et al. 2018). The SAGAN code both references use
  overwrites its vectors outside autograd (`.data =`), so D's backward differentiates the sigma of every
  call of the iteration with the last call's vectors: the same values forward, slightly other gradients
  for D's weights (not for the student). `adv_spectral_norm=shared` reproduces that exactly
  (`SharedVectorSpectralNorm`; tests/conformance/skd.json follows three iterations of D's update with it).
- Its input: the score maps (logits, not probabilities, as both codes) at 1/`adv_stride` of the input
  size (8: the 1/8-resolution logits both codes feed it; the suite's logits are upsampled to the input,
  so they are resized back, bilinearly). The four stride-2 convolutions and the valid 4x4 one need 64
  pixels a side: a smaller map (a small crop) is resized up to 64 (CIRKD would fail there, e.g. CamVid's
  360 crops give 45x45 maps). D and its losses run in fp32 under mixed precision (power iteration,
  attention softmax; the maps are small).
- Losses: `adv_loss=hinge` (CIRKD's `train_kd.py`, the default) or `wgan-gp` (the authors' default, the
  paper's Wasserstein form) with `adv_gp_weight` (lambda_gp = 10). The student's term is
  `adv_weight` x L_adv (CIRKD `--lambda-adv 0.001`; the authors weight it with lambda_d = 0.1, i.e.
  `adv_weight=0.1`), D's loss `adv_d_weight` x L_D (lambda_d = 0.1 in both; the authors also multiply the
  penalty by it: lambda_d * lambda_gp * GP, as here).
- D's update, every iteration, after the student's (CIRKD and the authors: student step, then D step),
  on the same step's score maps detached (so D scores the student as it was before its step, as both):
  Adam, lr 4e-4, betas (0.9, 0.99), no weight decay, constant lr (CIRKD; `adv_d_optimizer=adam`,
  `adv_d_schedule=constant`); the authors use SGD with the student's momentum and weight decay and the
  poly schedule (`adv_d_optimizer=sgd adv_d_schedule=poly`, lr (1 - i/N)^power as the student's).
- D's calls per step are those of CIRKD in its order: D(Q^s) for the student's term, then D(Q^s), D(Q^t)
  (and, with WGAN-GP, D(Q^)) for its own loss; each call is one power iteration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sdesbench.config import rng
from sdesbench.methods.base import MethodContext, StepInfo
from sdesbench.methods.kl import kd_term
from sdesbench.methods.losses import fp32, full_precision
from sdesbench.methods.teacher_student import TeacherStudentMethod
from sdesbench.models.base import to_size

AdvLoss = Literal["hinge", "wgan-gp"]
DOptimizer = Literal["adam", "sgd"]
DSchedule = Literal["constant", "poly"]
Preprocess = Literal["bn", "tanh"]
SpectralNormMode = Literal["per_call", "shared"]  # torch's spectral_norm | the SAGAN code's (shared vectors)

DISCRIMINATOR_MIN_SIZE = 64  # four stride-2 convolutions, then a 4x4 valid one: 64 / 16 = 4
ADAM_BETAS = (0.9, 0.99)  # CIRKD train_kd.py's D_optimizer


# ----------------------------------------------------------------------------- the discriminator


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019): x + gamma * attention-weighted values, gamma starting at 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Conv2d(channels, channels // 8, 1)
        self.key = nn.Conv2d(channels, channels // 8, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query(x).flatten(2)  # B x C/8 x N
        k = self.key(x).flatten(2)
        v = self.value(x).flatten(2)  # B x C x N
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # B x N x N, over the attended positions
        return x + self.gamma * (v @ attention.transpose(1, 2)).view_as(x)


class SharedVectorSpectralNorm:
    """Spectral normalisation as the SAGAN code of CIRKD and the SKD authors computes it (`utils/sagan.py`
    `SpectralNorm`): one power iteration per call (v, then u), W / sigma with sigma = u^T W v, and the vectors
    overwritten outside autograd's tracking, so a backward pass differentiates the sigma of every call since
    the last backward with the vectors of the latest call (torch's `spectral_norm` uses each call's own).
    A forward pre-hook with torch's state-dict names (`weight_orig`, `weight_u`, `weight_v`)."""

    def __init__(self, conv: nn.Conv2d):
        weight = conv.weight
        del conv._parameters["weight"]
        conv.register_parameter("weight_orig", weight)
        rows = weight.shape[0]
        conv.register_buffer("weight_u", F.normalize(weight.detach().new_empty(rows).normal_(), dim=0))
        conv.register_buffer("weight_v", F.normalize(weight.detach().new_empty(weight[0].numel()).normal_(), dim=0))
        conv.weight = weight.detach()  # a plain attribute until the first call computes it
        conv.register_forward_pre_hook(self)

    def __call__(self, conv: nn.Conv2d, inputs: Any) -> None:
        mat = conv.weight_orig.flatten(1)
        if conv.training:
            u, v = conv.weight_u.data, conv.weight_v.data  # `.data`: no version bump, as the reference's
            with torch.no_grad():
                v.copy_(F.normalize(mat.t() @ u, dim=0, eps=1e-12))
                u.copy_(F.normalize(mat @ v, dim=0, eps=1e-12))
        conv.weight = conv.weight_orig / torch.dot(conv.weight_u, mat @ conv.weight_v)


def spectral_normed(conv: nn.Conv2d, mode: SpectralNormMode) -> nn.Conv2d:
    """`conv` with spectral normalisation: torch's (`per_call`) or the SAGAN code's (`shared`)."""
    if mode == "per_call":
        return nn.utils.spectral_norm(conv)
    SharedVectorSpectralNorm(conv)
    return conv


class ScoreMapDiscriminator(nn.Module):
    """CIRKD's / the SKD authors' SAGAN discriminator on B x C x H x W score maps (H, W >= 64): one score per
    position of a B x 1 x (H/16 - 3) x (W/16 - 3) map (module docstring)."""

    def __init__(self, num_classes: int, preprocess: Preprocess = "bn", spectral_norm: SpectralNormMode = "per_call",
                 width: int = 64):
        super().__init__()
        self.preprocess = nn.BatchNorm2d(num_classes) if preprocess == "bn" else nn.Tanh()
        chans = [num_classes, width, 2 * width, 4 * width, 8 * width]
        self.down = nn.ModuleList(spectral_normed(nn.Conv2d(a, b, 4, 2, 1), spectral_norm)
                                  for a, b in zip(chans, chans[1:]))
        self.attend = nn.ModuleList([SelfAttention(chans[3]), SelfAttention(chans[4])])  # after the 3rd and 4th
        self.score = nn.Conv2d(chans[4], 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        for i, conv in enumerate(self.down):
            x = F.leaky_relu(conv(x), 0.1)
            if i >= 2:
                x = self.attend[i - 2](x)
        return self.score(x)


# ----------------------------------------------------------------------------- the losses


def generator_adversarial_loss(d_student: torch.Tensor) -> torch.Tensor:
    """The student's side of l_ho (Liu et al. Sec. 3.3): -mean D(Q^s), for the hinge and WGAN losses alike."""
    return -d_student.mean()


def hinge_discriminator_loss(d_teacher: torch.Tensor, d_student: torch.Tensor) -> torch.Tensor:
    """D's hinge loss (CIRKD `CriterionAdv('hinge')`): mean relu(1 - D(Q^t)) + mean relu(1 + D(Q^s))."""
    return F.relu(1.0 - d_teacher).mean() + F.relu(1.0 + d_student).mean()


def wasserstein_discriminator_loss(d_teacher: torch.Tensor, d_student: torch.Tensor) -> torch.Tensor:
    """D's side of l_ho (Sec. 3.3, WGAN critic; the authors' `CriterionAdv('wgan-gp')`): mean D(Q^s) - mean D(Q^t)."""
    return d_student.mean() - d_teacher.mean()


def gradient_penalty(discriminator: nn.Module, teacher_map: torch.Tensor, student_map: torch.Tensor,
                     alpha: torch.Tensor) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017; the authors' `CriterionAdditionalGP` without its lambda_gp):
    mean_b (||d D(Q^_b) / d Q^_b||_2 - 1)^2 with Q^ = alpha Q^t + (1 - alpha) Q^s (alpha: B x 1 x 1 x 1)."""
    mixed = (alpha * teacher_map.detach() + (1 - alpha) * student_map.detach()).requires_grad_(True)
    # D reads a view of the leaf (the same gradient): hooks on a module's inputs, as torch's FlopCounterMode
    # (the reports' training-FLOPs count) sets, cannot run on a leaf inside autograd.grad
    (grad,) = torch.autograd.grad(discriminator(mixed.view_as(mixed)).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


# ----------------------------------------------------------------------------- options and the module


@dataclass
class AdversarialOptions:
    adv_weight: float = field(default=0.001, metadata=rng(0.0, doc="weight of the student's adversarial term "
                                                                    "(CIRKD --lambda-adv 0.001)"))
    adv_d_weight: float = field(default=0.1, metadata=rng(0.0, doc="weight of the discriminator's loss "
                                                                   "(lambda_d 0.1)"))
    adv_loss: AdvLoss = "hinge"  # CIRKD; wgan-gp: the authors' (and the paper's Wasserstein form)
    adv_gp_weight: float = field(default=10.0, metadata=rng(0.0, doc="lambda_gp of wgan-gp's gradient penalty"))
    adv_d_optimizer: DOptimizer = "adam"  # CIRKD Adam(4e-4, betas 0.9/0.99); sgd: the authors'
    adv_d_lr: float = field(default=4e-4, metadata=rng(1e-8, doc="the discriminator's learning rate"))
    adv_d_schedule: DSchedule = "constant"  # CIRKD; poly: the authors' (as the student's schedule)
    adv_stride: int = field(default=8, metadata=rng(1, 64, doc="D reads the score maps at 1/stride of the input"))
    adv_preprocess: Preprocess = "bn"
    adv_spectral_norm: SpectralNormMode = "per_call"  # shared: CIRKD's / the authors' SAGAN code exactly


def adversary_enabled(opts: AdversarialOptions) -> bool:
    """Whether the run has a discriminator at all (either weight non-zero; both 0: no D, no own update)."""
    return opts.adv_weight > 0 or opts.adv_d_weight > 0


def score_map_size(input_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """The size D reads the score maps at: the input size / stride (rounded up, as a stride-s network's
    output), at least DISCRIMINATOR_MIN_SIZE a side."""
    return tuple(max(DISCRIMINATOR_MIN_SIZE, -(-int(s) // stride)) for s in input_size)  # type: ignore[return-value]


class HolisticAdversary(nn.Module):
    """The discriminator, the score maps it keeps from the student's step for its own update, and that
    update's optimizer (and lr schedule). A method owns one and delegates `own_optimizer` / `own_loss_terms`
    to it; it is a module of the method, so DDP averages D's gradients and the checkpoint holds its weights
    and buffers (spectral-norm vectors, BN statistics)."""

    def __init__(self, opts: AdversarialOptions, num_classes: int):
        super().__init__()
        self.opts = opts
        self.discriminator = ScoreMapDiscriminator(num_classes, opts.adv_preprocess, opts.adv_spectral_norm)
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (student, teacher) maps, detached
        self.optimizer: torch.optim.Optimizer | None = None
        self.poly_power = 0.9

    def critic(self, score_map: torch.Tensor) -> torch.Tensor:
        with full_precision():
            return self.discriminator(fp32(score_map))

    def generator_term(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       input_size: tuple[int, int]) -> torch.Tensor:
        """adv_weight x L_adv on the student's score map; keeps both maps (detached) for D's own update."""
        size = score_map_size(input_size, self.opts.adv_stride)
        s, t = to_size(student_logits, size), to_size(teacher_logits, size)
        self.kept = (s.detach(), t.detach())
        return self.opts.adv_weight * generator_adversarial_loss(self.critic(s))

    def make_optimizer(self, train: Any) -> torch.optim.Optimizer:
        """D's optimizer (`train`: the TrainConfig, for SGD's momentum and weight decay and the poly power)."""
        params = list(self.discriminator.parameters())
        if self.opts.adv_d_optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=self.opts.adv_d_lr, betas=ADAM_BETAS)
        else:
            self.optimizer = torch.optim.SGD(params, lr=self.opts.adv_d_lr, momentum=train.momentum,
                                             weight_decay=train.weight_decay)
        self.poly_power = train.poly_power
        return self.optimizer

    def discriminator_terms(self, step: StepInfo) -> dict[str, torch.Tensor]:
        """D's loss on the kept maps (`adv_d`, and `adv_gp` with wgan-gp), after setting this iteration's lr."""
        if self.kept is None:
            raise RuntimeError("the discriminator's update ran before the student's loss kept its score maps")
        if self.opts.adv_d_schedule == "poly" and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.opts.adv_d_lr * (1 - step.iteration / step.total_iters) ** self.poly_power
        s, t = self.kept
        self.kept = None
        d_student, d_teacher = self.critic(s), self.critic(t)
        w = self.opts.adv_d_weight
        if self.opts.adv_loss == "hinge":
            return {"adv_d": w * hinge_discriminator_loss(d_teacher, d_student)}
        alpha = torch.rand(s.shape[0], 1, 1, 1, device=s.device)
        with full_precision():
            penalty = gradient_penalty(self.discriminator, fp32(t), fp32(s), alpha)
        return {"adv_d": w * wasserstein_discriminator_loss(d_teacher, d_student),
                "adv_gp": w * self.opts.adv_gp_weight * penalty}


class KDAdversarialMethod(TeacherStudentMethod):
    """A teacher-student method whose loss adds CIRKD's pixel KD (`kd`, the `kl` term, options `kd_*`) and
    the holistic adversarial term (`adv`, options `adv_*`) to its own, with the discriminator's own update
    (`adv_d`). Subclasses combine `KLOptions` and `AdversarialOptions` into their `Options`."""
    option_prefix = "adv_"  # of the options it adds (a subclass names its own)

    def __init__(self, options: Any, ctx: MethodContext):
        super().__init__(options, ctx)
        self.adversary = HolisticAdversary(options, ctx.num_classes) if adversary_enabled(options) else None

    def kd_and_adversarial_terms(self, student_out: dict[str, Any], labels: torch.Tensor,
                                 teacher_out: dict[str, Any]) -> dict[str, torch.Tensor]:
        terms = {"kd": kd_term(self.opts, student_out["logits"], teacher_out["logits"], labels)}
        if self.adversary is not None:
            terms["adv"] = self.adversary.generator_term(student_out["logits"], teacher_out["logits"],
                                                         tuple(labels.shape[-2:]))
        return terms

    def own_optimizer(self, train: Any) -> torch.optim.Optimizer | None:
        return self.adversary.make_optimizer(train) if self.adversary is not None else None

    def own_loss_terms(self, step: StepInfo) -> dict[str, torch.Tensor]:
        if self.adversary is None:
            return super().own_loss_terms(step)
        return self.adversary.discriminator_terms(step)
