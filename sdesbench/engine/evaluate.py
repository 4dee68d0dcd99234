"""Evaluation: confusion matrices of the student and of any extra prediction a method offers (SDES's Ens-T),
accumulated on the device and all-reduced under DDP, over the predictions `engine.inference` makes (whole
images by default; sliding windows and test-time augmentation when the eval settings ask for them)."""
from __future__ import annotations

import signal
from typing import Any, Callable, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch.utils.data import DataLoader

from sdesbench.console import err as console
from sdesbench.data.base import EvalView, SizeGroupedBatches
from sdesbench.engine import distributed as D
from sdesbench.engine.inference import Inference, predictions
from sdesbench.engine.metrics import ConfusionMatrix, image_counts, predict
from sdesbench.methods.base import Method
from sdesbench.models import SegmentationModel


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
def evaluate(model: SegmentationModel, dataset: EvalView, num_classes: int, device: torch.device,
             batch_size: int = 1, method: Method | None = None, amp: torch.dtype | None = None,
             show_progress: bool = False, should_stop: Callable[[], bool] = lambda: False, scale: float = 1.0,
             size: Sequence[int] | None = None, per_image: bool = False,
             workers: int = 0, inference: Inference | None = None, absent: str = "skip",
             export: Callable[[int, torch.Tensor], Any] | None = None,
             confusion: bool = False) -> dict[str, dict[str, Any]] | None:
    """Evaluation of every image of `dataset`; returns {"student": metrics, <extra prediction name>: metrics, ...},
    or None when `should_stop()` became true between two batches (a signal during the evaluation).

    `per_image`: each metrics dict also holds "image_counts", the images x 3 x classes true positive,
    false positive and false negative counts (`metrics.image_counts`) in dataset order, gathered from
    every rank under DDP: what a per-image bootstrap needs, without evaluating again.

    `scale` / `size` (eval.scale, eval.size): the input is resized for inference (`inference_input`),
    the student's logits are resized back (bilinear) to the label's size and the metrics are computed
    at the label's resolution, as mmsegmentation's test pipeline does. Extra predictions (SDES's
    Ens-T) are computed from those label-sized logits and the full-resolution labels, so they go
    through the same resize. The default (scale 1, no size) scores the image as it is.

    `inference` (`Inference.of(cfg.eval)`: eval.mode, crop, stride, scales, flip, tta_rule, and scale / size,
    which it then replaces): sliding windows and test-time augmentation (`engine.inference`); the metrics are
    those of the merged prediction, per-image counts included. `absent` (eval.absent_classes): "skip" leaves a
    class in neither labels nor predictions out of the mIoU mean, "zero" counts it 0 (`metrics`).

    `export(index, class_map)` is called with every image's student prediction (H x W train ids, on the CPU),
    e.g. to write it to a file (`data.files.PredictionFiles`). `confusion`: each metrics dict also holds
    "confusion", the classes x classes confusion matrix (int64 on the CPU, rows = labels, columns = predictions).

    `workers` DataLoader processes decode the images while the device computes; with `batch_size`
    > 1 only images of equal size are batched together (`SizeGroupedBatches`). Neither changes a
    metric: every image is scored once and the confusion matrix does not depend on the order.
    """
    how = inference or Inference(scale=scale, size=tuple(size) if size is not None else None)
    was_training = model.training
    model.eval()
    if method is not None:
        method.eval()
    loader = eval_loader(dataset, batch_size, workers, pin_memory=device.type == "cuda")
    mats: dict[str, ConfusionMatrix] = {"student": ConfusionMatrix(num_classes, device)}
    rows: dict[str, list[torch.Tensor]] = {}
    # a live bar only on a terminal: elsewhere it would print its last state at the end (ProgressHook
    # prints the evaluation's line there)
    progress = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), console=console,
                        disable=not (show_progress and console.is_terminal), transient=True)
    with progress:
        task = progress.add_task("eval", total=len(loader))
        for batch, (images, labels) in zip(loader.batch_sampler, loader):
            if should_stop():
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            for name, logits in predictions(model, images, labels, method, amp, how).items():
                pred = predict(logits)
                mats.setdefault(name, ConfusionMatrix(num_classes, device)).update(pred, labels)
                if per_image:
                    rows.setdefault(name, []).append(image_counts(pred, labels, num_classes).cpu())
                if export is not None and name == "student":
                    for index, class_map in zip(batch, pred.cpu()):
                        export(index, class_map)
            progress.advance(task)
    model.train(was_training)
    if method is not None:
        method.train(was_training)
    if not D.all_true(not should_stop(), device):  # every rank returns the same way (no one hangs)
        return None
    results = {}
    for name, mat in mats.items():
        mat.all_reduce()
        results[name] = mat.compute(absent)
        if confusion:
            results[name]["confusion"] = mat.mat.cpu()
        if per_image:
            mine = torch.cat(rows[name]) if rows.get(name) else torch.zeros(0, 3, num_classes, dtype=torch.int64)
            indices = [i for batch in loader.batch_sampler for i in batch]  # the order images were scored in
            results[name]["image_counts"] = D.gather_rows(mine, indices, len(dataset))
    return results
