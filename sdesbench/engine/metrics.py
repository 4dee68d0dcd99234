"""Segmentation metrics from a confusion matrix accumulated on the device.

Under DDP the *matrix* is all-reduced (summing counts), never the per-rank mIoU, so the metric
is exactly the single-process one on the same images.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sdesbench import IGNORE_INDEX


def predict(logits: torch.Tensor) -> torch.Tensor:
    """Class map B x H x W from logits B x C x H x W (the first maximum wins, as with argmax).

    `max(1).indices` instead of `argmax(1)`: on CPU argmax over a non-innermost dimension is
    4-5x slower, which made it the bulk of the metric's cost at evaluation (docs/performance.md).
    """
    return logits.max(1).indices


class ConfusionMatrix:
    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer label maps of equal shape; rows = target, columns = prediction."""
        # ignored pixels go to one extra bin that is dropped: no boolean indexing, which would
        # compact the tensor and, on CUDA, wait for the device to learn the result's size
        c2 = self.num_classes**2
        idx = torch.where(target == self.ignore_index, c2, target.long() * self.num_classes + pred.long())
        self.mat += torch.bincount(idx.flatten(), minlength=c2 + 1)[:c2].view(self.num_classes, self.num_classes)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def compute(self) -> dict[str, float | list[float | None]]:
        """mIoU over classes that occur in target or prediction (union > 0); PA over labelled pixels."""
        m = self.mat.double().cpu()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        iou = tp / union.clamp(min=1)
        present = union > 0
        miou = float(iou[present].mean()) if present.any() else 0.0
        total = m.sum()
        pa = float(tp.sum() / total) if total > 0 else 0.0
        per_class = [float(v) if p else None for v, p in zip(iou, present)]
        return {"miou": miou, "pixel_acc": pa, "per_class_iou": per_class}


@torch.no_grad()
def image_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per image and class, over labelled pixels: true positives, false positives, false negatives
    (B x 3 x C, int64). Summed over images they are the confusion matrix's diagonal, column sums minus
    the diagonal and row sums minus the diagonal, so any subset of images gives its own mIoU (bootstrap)."""
    b, c = pred.shape[0], num_classes
    offset = (torch.arange(b, device=pred.device) * c).view(b, *([1] * (pred.dim() - 1)))
    valid = target != ignore_index
    drop = b * c  # one extra bin for ignored pixels, dropped below

    def per_image(index: torch.Tensor) -> torch.Tensor:
        return torch.bincount(index.flatten(), minlength=drop + 1)[:drop].view(b, c)

    tp = per_image(torch.where(valid & (pred == target), target.long() + offset, drop))
    predicted = per_image(torch.where(valid, pred.long() + offset, drop))
    labelled = per_image(torch.where(valid, target.long() + offset, drop))
    return torch.stack([tp, predicted - tp, labelled - tp], 1)
