"""Decode + augment throughput of a dataset's training stream (images/s), the number that says how
many DataLoader workers keep a GPU fed.

`measure_throughput` runs exactly what a training worker runs (`TrainView`: decode, random scale,
crop padded with the ignore index, flip, normalise) over the keys of the training sampler. With
`workers=0` it runs in this process with one intra-op thread, as a DataLoader worker does
(DataLoader sets torch threads to 1 in its workers), giving images/s per worker; with `workers=k`
it times a real DataLoader after its first batch (worker start-up excluded).
"""
from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

from sdesbench.data.base import IterationSampler, SegDataset, TrainView


def measure_throughput(dataset: SegDataset, crop: tuple[int, int] | list[int] = (512, 512), n: int = 64,
                       scale: tuple[float, float] | list[float] = (0.5, 2.0), flip: bool = True, workers: int = 0,
                       batch_size: int = 8, seed: int = 0) -> dict[str, float]:
    """{"images_per_s", "per_worker", "seconds", "images"} for `n` augmented training crops; with
    `workers=0` also "per_cpu_s", images per second of this thread's CPU time, which does not
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
                "images": n}
    iters = max(2, -(-n // batch_size) + 1)  # one extra batch, excluded from the timing
    sampler = IterationSampler(len(view), batch_size, iters, seed)
    loader = DataLoader(view, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        prefetch_factor=2)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    images = sum(len(images) for images, _ in it)
    seconds = time.perf_counter() - t0
    rate = images / seconds
    return {"images_per_s": rate, "per_worker": rate / workers, "seconds": seconds, "images": images}
