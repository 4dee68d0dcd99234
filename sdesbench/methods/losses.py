"""Loss terms shared by several methods. Method-specific terms live in the method's own file.

Under mixed precision, compute matrix products (similarities, Gram matrices, correlations) and
softmax/KL at a temperature inside `full_precision()` on `fp32(...)` inputs: autocast would run a
matmul in bf16/fp16 even on fp32 inputs (docs/performance.md). Elementwise terms only need `.float()`
on their inputs, as `pixel_ce` and `class_kl_map` do."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from sdesbench import IGNORE_INDEX


def pixel_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Eq. 1: pixel-wise cross-entropy, mean over the non-ignored pixels.

    The paper writes 1/(H x W); with ignored pixels the mean is over the labelled ones (the
    convention of every public segmentation codebase). An all-ignored batch gives 0, not NaN.
    """
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)


def task_terms(student_out: dict, labels: torch.Tensor, aux_weight: float) -> dict[str, torch.Tensor]:
    """Eq. 1 on the student's logits, plus `aux_weight` x the same CE on its aux head when it has one."""
    terms = {"ss": pixel_ce(student_out["logits"], labels)}
    if student_out.get("aux") is not None:
        terms["aux"] = aux_weight * pixel_ce(student_out["aux"], labels)
    return terms


def class_kl_map(target_logits: torch.Tensor, input_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-pixel KL(softmax(target/T) || softmax(input/T)) over dim 1: B x C x H x W -> B x H x W."""
    log_p = F.log_softmax(target_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(input_logits.float() / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def hinton_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton et al. 2015 soft-target loss: T^2 * mean over pixels (valid ones, if given) of KL(p^T || p^S)."""
    kl = class_kl_map(teacher_logits.detach(), student_logits, temperature)
    if valid is not None:
        if not bool(valid.any()):
            return kl.sum() * 0.0
        kl = kl[valid]
    return temperature ** 2 * kl.mean()


def valid_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return labels != ignore_index


def labels_at(labels: torch.Tensor, size) -> torch.Tensor:
    """B x H x W labels at another spatial size by nearest-neighbour sampling (label values, the ignore
    index included, are kept as they are); labels already at that size are returned unchanged."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels.unsqueeze(1).float(), size=tuple(size), mode="nearest").squeeze(1).long()


@contextmanager
def full_precision() -> Iterator[None]:
    """Run the enclosed code in fp32 even inside the Trainer's autocast (bf16/fp16 on CUDA).

    Use it around softmax/log-softmax/KL at a temperature and attention-map computations: in
    half precision `exp(z / tau)` loses the small probabilities that distillation transfers, and
    sums over H x W pixels overflow fp16. Autocast is switched off for CUDA and CPU; tensors
    produced *before* the block keep their dtype, so cast them with `fp32(...)`:

        with full_precision():
            s, t = fp32(student_logits, teacher_logits)
            loss = F.kl_div(F.log_softmax(s / tau, 1), F.log_softmax(t / tau, 1), log_target=True, ...)
    """
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        yield


def fp32(*tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Floating-point tensors cast to float32 (others unchanged); one tensor in, one out."""
    out = tuple(t.float() if t.is_floating_point() else t for t in tensors)
    return out[0] if len(out) == 1 else out
