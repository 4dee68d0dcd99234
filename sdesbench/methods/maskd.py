"""`maskd-tokens` and `maskd`: masked distillation with receptive tokens (Huang et al., "Masked Distillation
with Receptive Tokens", ICLR 2023), its two stages as the segmentation code runs them.

Stage 1 (`maskd-tokens`) learns T receptive tokens P (T x C, C = the classes) on the frozen trained teacher.
Each token gives a soft mask over the positions of the teacher's logits z^T (B x C x H x W):

    M_t = sigmoid(P_t . z^T)             (a pixel-wise attention of token t; B x T x H x W)
    L_tokens = CE(sum_t M_t . z^T, y) + maskd_dice_weight * L_dice
    L_dice = 1/(B T (T-1)) sum_b sum_{i != j} 2 <M_i, M_j> / (|M_i|^2 + |M_j|^2)

the task loss of the teacher's logits re-weighted by the masks, plus a Dice coefficient between every two masks
of an image that keeps them apart (the paper's diversity term; the code's `dice_coeff`). Only P is trained.

Stage 2 (`maskd`) distils the student with the masks of those tokens, computed on the teacher's logits:

    L_maskd = 1/2 * 1/(B T C) sum_{b,t,c} sum_hw M_t^2 (z^S_c - z^T_c)^2 / (sum_hw M_t + 1e-5)
    L = L_SS (Eq. 1 of SDES) + aux_weight * CE(aux) + maskd_weight * L_maskd
        [+ maskd_aux_weight * maskd_weight * L_maskd on the aux heads' logits, when both networks have one]

a squared error per mask, normalised by the mask's area. The reference multiplies the mask into both maps
before squaring, so the weight is M^2; written that way here. The equations are written out from the
segmentation code; the paper (Sec. 3) describes the same three parts: the receptive tokens' pixel-wise
attention masks, learnt with the task loss and a Dice loss on a fixed teacher, then distillation per mask.

Reference code: hunto/MasKD `segmentation/losses/maskd.py` (`MaskModule`, `dice_coeff`, `MasKDLoss`) with
`segmentation/train_mask_module.py` (stage 1) and `segmentation/train_maskd.py` (stage 2);
tests/conformance/maskd.json holds their outputs on seeded inputs.

The stage-1 run is a run of the one Trainer: its network is the trained teacher itself, frozen and in eval
mode (`student_is_teacher`: the run's `model` is `teacher.model` and it loads `teacher.checkpoint`), and its
only trainable parameters are the tokens, which its checkpoint holds in the method state (`tokens`). Its
evaluation scores the teacher. (The masked logits sum_t M_t . z^T are z^T scaled per pixel by the positive
sum_t M_t: their argmax is the teacher's, so they are not scored; stage 1's CE only learns where the masks
sharpen the teacher's prediction and where they flatten it.) Stage 2 reads the tokens from that checkpoint
(`maskd_tokens`), after checking it is a `maskd-tokens` run on the same teacher.

Choices (docs/methods-frontier.md lists every difference):
- Which map: the logits (C = the classes), as the segmentation code does (`MaskModule(channels=19)` on
  `outputs[0]`); the paper's detection experiments put the tokens on FPN features.
- Resolution: the logits at input size (the suite's output contract); the reference computes the masks and
  both losses on the decode head's 1/8-resolution logits, and upsamples the re-weighted logits for its CE.
- Teacher mode in stage 1: eval (running BN statistics), as every frozen teacher of the suite; the reference's
  stage-1 script leaves the teacher in train mode under no_grad (BN on batch statistics).
- No mask weighting module: the paper weights the masks per image for detection; the segmentation code
  averages them uniformly, and so does this.
- The reference's stage-1 CE on the teacher's (unmasked) aux head has no gradient to the tokens and is left
  out; stage 2's aux term is the reference's 0.4 x lambda_kd x L_maskd on the aux logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sdesbench.config import rng
from sdesbench.errors import CheckpointError, ConfigError
from sdesbench.io import load_checkpoint
from sdesbench.methods.base import METHODS, Method, MethodContext, StageRun
from sdesbench.methods.losses import fp32, full_precision, pixel_ce
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions

MASK_AREA_EPS = 1e-5  # MasKDLoss: the mask's area + 1e-5
DICE_EPS = 1e-12  # dice_coeff: added to each squared norm


def receptive_masks(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """M_t = sigmoid(P_t . z) at every position: tokens T x C, logits B x C x H x W -> masks B x T x H x W."""
    return torch.einsum("tc,bchw->bthw", tokens, logits).sigmoid()


def dice_diversity_loss(masks: torch.Tensor) -> torch.Tensor:
    """L_dice: the Dice coefficient 2<M_i, M_j> / (|M_i|^2 + |M_j|^2) of every ordered pair i != j of an image's
    masks (B x T x H x W), averaged over the pairs and the images (`dice_coeff`, 1e-12 added to each norm)."""
    flat = masks.flatten(2)  # B x T x HW
    inner = flat @ flat.transpose(1, 2)  # B x T x T
    norms = flat.pow(2).sum(-1) + DICE_EPS  # B x T
    dice = 2 * inner / (norms.unsqueeze(1) + norms.unsqueeze(2))
    t = masks.shape[1]
    off_diagonal = ~torch.eye(t, dtype=torch.bool, device=masks.device)
    return dice[:, off_diagonal].sum() / (masks.shape[0] * t * (t - 1))


def masked_logits(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """sum_t M_t . z: the logits re-weighted by every mask and summed over the masks (B x C x H x W)."""
    return logits * masks.sum(1, keepdim=True)


def token_loss_terms(tokens: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                     dice_weight: float) -> dict[str, torch.Tensor]:
    """Stage 1's two terms: CE of the masked teacher logits (`tokens_ce`), dice_weight x L_dice (`tokens_dice`)."""
    with full_precision():
        tokens, z = fp32(tokens, teacher_logits.detach())
        masks = receptive_masks(tokens, z)
        return {"tokens_ce": pixel_ce(masked_logits(z, masks), labels),
                "tokens_dice": dice_weight * dice_diversity_loss(masks)}


def masked_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """L_maskd: 1/2 * mean over (b, t, c) of sum_hw M_t^2 (s_c - t_c)^2 / (sum_hw M_t + 1e-5) (`MasKDLoss`),
    without the B x T x C x H x W tensor the reference builds."""
    with full_precision():
        s, t, m = fp32(student, teacher.detach(), masks.detach())
        per_mask = torch.einsum("bthw,bchw->btc", m.pow(2), (s - t).pow(2))  # B x T x C
        area = m.sum((2, 3)).unsqueeze(-1) + MASK_AREA_EPS  # B x T x 1
        return 0.5 * (per_mask / area).mean()


@dataclass
class TokenOptions:
    """Stage 1's options; stage 2 (`maskd`) has them too, so that a table row sets them once for both runs."""

    maskd_num_tokens: int = field(default=8, metadata=rng(2, doc="receptive tokens T (num_tokens=8)"))
    maskd_dice_weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of L_dice in stage 1 (the "
                                                                        "script adds mask_loss unweighted)"))


def initial_tokens(num_tokens: int, channels: int) -> torch.Tensor:
    """N(0, 0.01^2) entries, as `MaskModule` initialises its tokens (torch's generator, like any weight)."""
    return torch.randn(num_tokens, channels) * 0.01


@METHODS.register("maskd-tokens")
class MasKDTokens(Method):
    """MasKD stage 1: the receptive tokens learnt on the frozen teacher (L_tokens); see the module docstring.
    The run's network is the teacher itself (`student_is_teacher`), its only trainable parameters the tokens."""

    needs_teacher = True
    teacher_free = False
    student_is_teacher = True
    logged_terms = ("tokens_ce", "tokens_dice")
    conformance = "maskd.json"
    option_prefix = "maskd_"

    Options = TokenOptions

    def __init__(self, options: TokenOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        self.tokens = nn.Parameter(initial_tokens(options.maskd_num_tokens, ctx.num_classes))

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        # the "student" output is the frozen teacher's (the run's network is the teacher)
        return token_loss_terms(self.tokens, student_out["logits"], labels, self.opts.maskd_dice_weight)


@dataclass
class MasKDOptions(TokenOptions, TeacherStudentOptions):
    maskd_weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of L_maskd (--lambda-kd 1)"))
    maskd_aux_weight: float = field(default=0.4, metadata=rng(0.0, doc="L_maskd on the aux heads' logits, x "
                                                                       "maskd_weight (the script's 0.4)"))
    maskd_tokens: str | None = None  # the stage-1 (maskd-tokens) run's checkpoint; `sdesbench run` sets it


@METHODS.register("maskd")
class MasKD(TeacherStudentMethod):
    """MasKD stage 2: L_SS + maskd_weight * L_maskd with the stage-1 tokens' masks; see the module docstring."""

    logged_terms = ("ss", "maskd")
    conformance = "maskd.json"
    option_prefix = "maskd_"
    # stage 1 is a run of its own on the row's teacher, at train_mask_module.py's lr 0.1 and weight decay 1e-3, for
    # a quarter of the row's iterations (the reference's 10K tokens iterations against its students' 40K)
    stage = StageRun(method="maskd-tokens", artefact_option="maskd_tokens",
                     shared_options=("maskd_num_tokens", "maskd_dice_weight"),
                     settings={"train": {"lr": 0.1, "weight_decay": 1e-3}}, iters_fraction=0.25)

    Options = MasKDOptions

    def __init__(self, options: MasKDOptions, ctx: MethodContext):
        super().__init__(options, ctx)
        tokens = initial_tokens(options.maskd_num_tokens, ctx.num_classes)
        if ctx.read_artefacts:
            tokens = self.stage_one_tokens(options, ctx)
        self.register_buffer("tokens", tokens)  # frozen: the stage-1 run trained them

    @staticmethod
    def stage_one_tokens(options: MasKDOptions, ctx: MethodContext) -> torch.Tensor:
        """The tokens of the stage-1 checkpoint `maskd_tokens`, after checking it is a `maskd-tokens` run with
        this run's number of tokens and classes, trained on this run's teacher (the same weights)."""
        path = options.maskd_tokens
        if not path:
            raise ConfigError("method.maskd_tokens: maskd distils with the receptive tokens of a maskd-tokens run; "
                              "set it to that run's checkpoint (`sdesbench run` trains that run and sets it)")
        state = load_checkpoint(path)
        method = ((state.get("config") or {}).get("method") or {}).get("name")
        tokens = (state.get("method") or {}).get("tokens")
        if method != "maskd-tokens" or not isinstance(tokens, torch.Tensor):
            raise CheckpointError(f"method.maskd_tokens: {path} is not a maskd-tokens checkpoint (its method is "
                                  f"{method!r})")
        if tuple(tokens.shape) != (options.maskd_num_tokens, ctx.num_classes):
            raise CheckpointError(f"method.maskd_tokens: {path} holds {tokens.shape[0]} tokens over "
                                  f"{tokens.shape[1]} classes; this run has maskd_num_tokens="
                                  f"{options.maskd_num_tokens} and {ctx.num_classes} classes")
        if ctx.teacher is not None and not same_weights(state["model"], ctx.teacher.state_dict()):
            raise CheckpointError(f"method.maskd_tokens: {path} learnt its tokens on another teacher than "
                                  "teacher.checkpoint")
        return tokens.detach().float().cpu()

    def masked_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        with full_precision():
            masks = receptive_masks(self.tokens.float(), teacher.detach().float())
        return masked_distillation_loss(student, teacher, masks)

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        o = self.opts
        terms = self.task_terms(student_out, labels)
        terms["maskd"] = o.maskd_weight * self.masked_term(student_out["logits"], teacher_out["logits"])
        if student_out.get("aux") is not None and teacher_out.get("aux") is not None and o.maskd_aux_weight > 0:
            terms["maskd_aux"] = o.maskd_aux_weight * o.maskd_weight * self.masked_term(student_out["aux"],
                                                                                        teacher_out["aux"])
        return terms


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two state dicts hold the same tensors under the same names (compared on the CPU)."""
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
