"""Throughput: how many images per second the data loader delivers and evaluation processes.

- `loader_throughput` runs exactly what a training worker runs (`TrainView`: decode, random scale,
  crop padded with the ignore index, flip, normalise) over the keys of the training sampler. With
  `workers=0` it runs in this process with one intra-op thread, as a DataLoader worker does
  (DataLoader sets torch threads to 1 in its workers), giving images/s per worker and per CPU-second;
  with `workers=k` it times a real DataLoader after its first batch (worker start-up excluded).
  It is the number that says how many workers keep a GPU fed (`sdesbench data throughput`, `bench`).
- `eval_throughput`: whole-image inference, with the metric's share (argmax + confusion-matrix
  update) timed separately in the same loop, so the share is measured directly rather than as the
  difference of two noisy totals; and the whole evaluation as runs do it (`engine.evaluate`, with
  loader workers decoding images and batches of equal-size images), images/s end to end.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from sdesbench.data.base import EvalView, IterationSampler, SegDataset, TrainView
from sdesbench.engine.evaluate import evaluate
from sdesbench.engine.metrics import ConfusionMatrix, predict
from sdesbench.engine.runtime import Runtime
from sdesbench.models import build_model


def loader_throughput(dataset: SegDataset, crop: tuple[int, int] | list[int] = (512, 512), n: int = 64,
                      scale: tuple[float, float] | list[float] = (0.5, 2.0), flip: bool = True, workers: int = 0,
                      batch_size: int = 8, seed: int = 0, pin_memory: bool = False) -> dict[str, float]:
    """{"images_per_s", "per_worker", "seconds", "images", "workers"} for `n` augmented training crops;
    with `workers=0` also "per_cpu_s", images per second of this thread's CPU time, which does not
    depend on what else the machine is running (the wall-clock rate does)."""
    view = TrainView(dataset, list(crop), list(scale), flip)
    if workers == 0:
        keys = list(IterationSampler(len(view), 1, n + 1, seed))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            view[keys[0]]  # warm-up: first-call allocations and lazy imports
            t0, c0 = time.perf_counter(), time.thread_time()
            for key in keys[1:]:
                view[key]
            seconds, cpu_seconds = time.perf_counter() - t0, time.thread_time() - c0
        finally:
            torch.set_num_threads(threads)
        rate = n / seconds
        return {"images_per_s": rate, "per_worker": rate, "per_cpu_s": n / cpu_seconds, "seconds": seconds,
                "images": n, "workers": 0}
    iters = max(2, -(-n // batch_size) + 1)  # one extra batch, excluded from the timing
    sampler = IterationSampler(len(view), batch_size, iters, seed)
    loader = DataLoader(view, batch_size=batch_size, sampler=sampler, num_workers=workers, prefetch_factor=4,
                        pin_memory=pin_memory)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    images = sum(len(images) for images, _ in it)
    seconds = time.perf_counter() - t0
    rate = images / seconds
    return {"images_per_s": rate, "per_worker": rate / workers, "seconds": seconds, "images": images,
            "workers": workers}


def eval_throughput(model_name: str, dataset: SegDataset, n_images: int, runtime: Runtime, workers: int = 0,
                    batch_size: int = 1) -> dict[str, Any]:
    """Whole-image inference of a random-init model, with the metric's share timed separately; then
    the suite's own `evaluate` over the same images with `workers` loader processes and batches of
    `batch_size` equal-size images, timed as a whole (decoding, transfer, inference, metric and the
    workers' start-up, which a real evaluation set of hundreds of images amortises)."""
    torch.manual_seed(0)
    device = runtime.device
    model = build_model(model_name, dataset.num_classes).to(device).eval()
    view = EvalView(dataset, n_images)
    batches = [(im[None].to(device), lb[None].to(device)) for im, lb in (view[i] for i in range(len(view)))]
    mat = ConfusionMatrix(dataset.num_classes, device)
    t_model = t_metric = 0.0
    with torch.no_grad():
        for images, labels in batches[:2]:  # warm-up
            model(images)
        for images, labels in batches:
            runtime.synchronize()
            t0 = time.perf_counter()
            with runtime.autocast():
                logits = model(images)["logits"]
            runtime.synchronize()
            t1 = time.perf_counter()
            mat.update(predict(logits), labels)
            runtime.synchronize()
            t_metric += time.perf_counter() - t1
            t_model += t1 - t0
    n = len(batches)
    runtime.synchronize()
    t0 = time.perf_counter()
    evaluate(model, view, dataset.num_classes, device, batch_size, amp=runtime.amp, workers=workers)
    runtime.synchronize()
    t_loop = time.perf_counter() - t0
    return {"images": n, "images_per_s": round(n / t_model, 3),
            "images_per_s_with_metric": round(n / (t_model + t_metric), 3),
            "metric_overhead": round(t_metric / t_model, 5),
            "with_loader": {"workers": workers, "batch_size": batch_size, "images_per_s": round(n / t_loop, 3)}}
