"""Segmentation metrics from a confusion matrix accumulated on the device.

Under DDP the *matrix* is all-reduced (summing counts), never the per-rank mIoU, so the metric
is exactly the single-process one on the same images.

Conventions (mmsegmentation's `IoUMetric.total_area_to_metrics`, open-mmlab/mmsegmentation
mmseg/evaluation/metrics/iou_metric.py at 3d50cc3c5be3: per class IoU = TP / (TP + FP + FN) and accuracy
= TP / (TP + FN), each averaged with `nanmean`):
- a class in neither the labels nor the predictions of the evaluated set (union 0) has no IoU and is left out
  of the mIoU mean (`absent="skip"`); CIRKD's `SegmentationMetric` (winycg/CIRKD utils/score.py) divides by
  all classes instead, so such a class counts as 0 (`absent="zero"`, eval.absent_classes);
- a class predicted but absent from the labels has IoU 0 (its union is its false positives), which the mIoU
  mean includes, and no accuracy (TP + FN = 0), which the mAcc mean leaves out;
- PA (mmsegmentation's aAcc) is TP over all labelled pixels;
- Dice = 2 TP / (2 TP + FP + FN) and F-score = 2 precision recall / (precision + recall) (beta 1), precision =
  TP / (TP + FP), recall = accuracy: mmsegmentation's `mDice` and `mFscore`, NaN where a denominator is 0 (and
  the F-score also where precision = recall = 0), averaged like the others;
- `absent="zero"` (mmsegmentation's `nan_to_num=0`) turns every undefined per-class value to 0 before the mean,
  in mIoU, mAcc, mDice and mFscore alike.
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

    def compute(self, absent: str = "skip") -> dict[str, float | list[float | None]]:
        """mIoU, PA, mAcc, mDice, mFscore and the per-class IoU / accuracy / Dice / F-score (None where undefined),
        by the conventions of the module docstring; `absent`: "skip" leaves an undefined class out of each mean
        (mmsegmentation's `nanmean`), "zero" counts it 0 (mmsegmentation's `nan_to_num=0`, CIRKD's all-class mean)."""
        m = self.mat.double().cpu()
        tp = m.diag()
        labelled = m.sum(1)  # TP + FN
        predicted = m.sum(0)  # TP + FP
        union = predicted + labelled - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union, nan)
        acc = torch.where(labelled > 0, tp / labelled, nan)
        dice = torch.where(predicted + labelled > 0, 2 * tp / (predicted + labelled), nan)
        precision = torch.where(predicted > 0, tp / predicted, nan)
        # F1 = 2 p r / (p + r), NaN where p or r is, and where p = r = 0 (a class labelled and predicted but never
        # right: mmsegmentation's f_score divides 0 by 0 there, so nanmean leaves it out of mFscore)
        fscore = 2 * precision * acc / (precision + acc)
        total = m.sum()
        pa = float(tp.sum() / total) if total > 0 else 0.0

        def mean(v: torch.Tensor) -> float:
            if absent == "zero":
                return float(v.nan_to_num(0.0).mean())
            defined = v[~v.isnan()]
            return float(defined.mean()) if len(defined) else 0.0

        def per_class(v: torch.Tensor) -> list[float | None]:
            return [None if x != x else x for x in v.tolist()]

        return {"miou": mean(iou), "pixel_acc": pa, "macc": mean(acc), "mdice": mean(dice), "mfscore": mean(fscore),
                "per_class_iou": per_class(iou), "per_class_acc": per_class(acc),
                "per_class_dice": per_class(dice), "per_class_fscore": per_class(fscore)}


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


def miou_convention(absent: str, num_classes: int | None = None) -> str:
    """One sentence naming how the mIoU was averaged (every report's header, `sdesbench eval`)."""
    if absent == "zero":
        over = f"all {num_classes} classes" if num_classes else "all classes"
        return (f"mIoU averages the IoU over {over}, a class in neither labels nor predictions counting 0 "
                f"(eval.absent_classes=zero, CIRKD's SegmentationMetric, mmsegmentation's nan_to_num=0); mAcc "
                f"(mean per-class accuracy) averages over {over} too, a class absent from the labels counting 0")
    return ("mIoU averages the IoU over the classes present in the labels or predictions of the evaluated images "
            f"(eval.absent_classes=skip, mmsegmentation's convention); {MACC_CONVENTION}")


MACC_CONVENTION = "mAcc (mean per-class accuracy) averages over the classes present in the labels"
