"""Whole-image evaluation: confusion matrices of the student and of any extra prediction a method
offers (SDES's Ens-T), accumulated on the device and all-reduced under DDP."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from torch.utils.data import DataLoader

from sdesbench.data.base import EvalView
from sdesbench.engine import distributed as D
from sdesbench.engine.metrics import ConfusionMatrix, predict
from sdesbench.methods.base import Method
from sdesbench.models import SegmentationModel

console = Console(stderr=True)


@torch.no_grad()
def evaluate(model: SegmentationModel, dataset: EvalView, num_classes: int, device: torch.device,
             batch_size: int = 1, method: Method | None = None, amp: torch.dtype | None = None,
             show_progress: bool = False,
             should_stop: Callable[[], bool] = lambda: False) -> dict[str, dict[str, Any]] | None:
    """Whole-image evaluation; returns {"student": metrics, <extra prediction name>: metrics, ...},
    or None when `should_stop()` became true between two batches (a signal during the evaluation)."""
    was_training = model.training
    model.eval()
    if method is not None:
        method.eval()
    sampler = D.shard_sampler(dataset) if D.is_distributed() else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=0)
    mats: dict[str, ConfusionMatrix] = {"student": ConfusionMatrix(num_classes, device)}
    progress = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), console=console,
                        disable=not show_progress, transient=True)
    with progress:
        task = progress.add_task("eval", total=len(loader))
        for images, labels in loader:
            if should_stop():
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                out = model(images)
                extra = method.eval_predictions(out, labels) if method is not None else {}
            mats["student"].update(predict(out["logits"]), labels)
            for name, logits in extra.items():
                mats.setdefault(name, ConfusionMatrix(num_classes, device)).update(predict(logits), labels)
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
    return results
