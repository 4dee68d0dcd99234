"""Whole-image evaluation: confusion matrices of the student and of any extra prediction a method
offers (SDES's Ens-T), accumulated on the device and all-reduced under DDP."""
from __future__ import annotations

import signal
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch.utils.data import DataLoader

from sdesbench.data.base import EvalView, SizeGroupedBatches
from sdesbench.engine import distributed as D
from sdesbench.engine.metrics import ConfusionMatrix, image_counts, predict
from sdesbench.methods.base import Method
from sdesbench.models import SegmentationModel
from sdesbench.models.base import to_size

console = Console(stderr=True)


def inference_input(images: torch.Tensor, scale: float = 1.0, size: Sequence[int] | None = None) -> torch.Tensor:
    """The evaluation input: `images` resized to `size` (H, W) or to `scale` times their size, bilinear
    and antialiased like the training crops' rescaling (`data.transforms`); unchanged at scale 1."""
    h, w = images.shape[-2:]
    target = (int(size[0]), int(size[1])) if size is not None else (max(1, round(h * scale)), max(1, round(w * scale)))
    if target == (h, w):
        return images
    return F.interpolate(images, size=target, mode="bilinear", align_corners=False, antialias=True)


def ignore_stop_signals(worker_id: int) -> None:
    """In a loader worker: leave SIGINT/SIGTERM to the main process, whose signal hook stops the
    evaluation between two batches; a worker killed by Ctrl-C would make the next batch fail instead.
    The workers end with the loader (and on their own when the main process is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def eval_loader(dataset: EvalView, batch_size: int = 1, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """This rank's share of `dataset` (all of it without DDP), in batches of equal-size images."""
    indices = D.shard_sampler(dataset) if D.is_distributed() else range(len(dataset))
    batches = SizeGroupedBatches(indices, dataset.image_size, batch_size) if batch_size > 1 else \
        [[i] for i in indices]
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=ignore_stop_signals if workers > 0 else None)


@torch.no_grad()
def predictions(model: SegmentationModel, images: torch.Tensor, labels: torch.Tensor, method: Method | None = None,
                amp: torch.dtype | None = None, scale: float = 1.0,
                size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Logits at the label's size of the student ("student") and of every extra prediction the method
    offers (SDES's "ens_t"), for images already on the device; the model must be in eval mode."""
    with torch.autocast(images.device.type, dtype=amp) if amp else nullcontext():
        out = model(inference_input(images, scale, size))
        out = {**out, "logits": to_size(out["logits"], labels.shape[-2:])}
        extra = method.eval_predictions(out, labels) if method is not None else {}
    return {"student": out["logits"], **extra}


@torch.no_grad()
def evaluate(model: SegmentationModel, dataset: EvalView, num_classes: int, device: torch.device,
             batch_size: int = 1, method: Method | None = None, amp: torch.dtype | None = None,
             show_progress: bool = False, should_stop: Callable[[], bool] = lambda: False, scale: float = 1.0,
             size: Sequence[int] | None = None, per_image: bool = False,
             workers: int = 0) -> dict[str, dict[str, Any]] | None:
    """Evaluation on whole images; returns {"student": metrics, <extra prediction name>: metrics, ...},
    or None when `should_stop()` became true between two batches (a signal during the evaluation).

    `per_image`: each metrics dict also holds "image_counts", the images x 3 x classes true positive,
    false positive and false negative counts (`metrics.image_counts`) in dataset order, gathered from
    every rank under DDP: what a per-image bootstrap needs, without evaluating again.

    `scale` / `size` (eval.scale, eval.size): the input is resized for inference (`inference_input`),
    the student's logits are resized back (bilinear) to the label's size and the metrics are computed
    at the label's resolution, as mmsegmentation's test pipeline does. Extra predictions (SDES's
    Ens-T) are computed from those label-sized logits and the full-resolution labels, so they go
    through the same resize. The default (scale 1, no size) scores the image as it is.

    `workers` DataLoader processes decode the images while the device computes; with `batch_size`
    > 1 only images of equal size are batched together (`SizeGroupedBatches`). Neither changes a
    metric: every image is scored once and the confusion matrix does not depend on the order.
    """
    was_training = model.training
    model.eval()
    if method is not None:
        method.eval()
    loader = eval_loader(dataset, batch_size, workers, pin_memory=device.type == "cuda")
    mats: dict[str, ConfusionMatrix] = {"student": ConfusionMatrix(num_classes, device)}
    rows: dict[str, list[torch.Tensor]] = {}
    progress = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), console=console,
                        disable=not show_progress, transient=True)
    with progress:
        task = progress.add_task("eval", total=len(loader))
        for images, labels in loader:
            if should_stop():
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            for name, logits in predictions(model, images, labels, method, amp, scale, size).items():
                pred = predict(logits)
                mats.setdefault(name, ConfusionMatrix(num_classes, device)).update(pred, labels)
                if per_image:
                    rows.setdefault(name, []).append(image_counts(pred, labels, num_classes).cpu())
            progress.advance(task)
    model.train(was_training)
    if method is not None:
        method.train(was_training)
    if not D.all_true(not should_stop(), device):  # every rank returns the same way (no one hangs)
        return None
    results = {}
    for name, mat in mats.items():
        mat.all_reduce()
        results[name] = mat.compute()
        if per_image:
            mine = torch.cat(rows[name]) if rows.get(name) else torch.zeros(0, 3, num_classes, dtype=torch.int64)
            indices = [i for batch in loader.batch_sampler for i in batch]  # the order images were scored in
            results[name]["image_counts"] = D.gather_rows(mine, indices, len(dataset))
    return results
