"""Loss terms shared by several methods. Method-specific terms live in the method's own file."""
from __future__ import annotations

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


def valid_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return labels != ignore_index
