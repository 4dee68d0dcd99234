"""Peak memory of one call (a training step), on CPU and on CUDA, measured the same way.

CUDA has an allocator statistic; the CPU has none, and the process's RSS never goes down, so a later
measurement would inherit an earlier one's peak. On CPU the call runs under `torch.profiler` with
`profile_memory=True`, whose allocation events (every CPU allocation and free, with its size and time)
are replayed in time order; the peak is the bytes alive before the call (given by the caller: its
parameters, optimizer state, batch, ...) plus the highest running sum of allocations during it. On
CUDA the same quantity is read from the allocator: the rise of `max_memory_allocated` above what was
allocated before the call, plus the same bytes alive before it. Either way, other objects in the
process (other methods' models in `bench`) do not count.

torch.profiler's kineto logs every start and stop on stderr (`USDT: ... profiler_start`), between
the lines of `bench` and `doctor`; it is told to keep quiet unless the user set `KINETO_LOG_LEVEL`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import torch


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and repeats counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def cpu_allocation_peak(fn: Callable[[], Any]) -> int:
    """Highest running sum of the CPU allocation events (+ allocated, - freed) while `fn` runs."""
    from torch.profiler import ProfilerActivity, profile

    # Kineto reads this once, when the process first profiles. Its start/stop lines are at its highest
    # level (5), so only 6 silences them, its own errors too (on a CPU machine: "gpuGetDeviceCount
    # failed"); a profiler that failed is caught below instead, as a step without allocations.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []

    def walk(node) -> None:
        size = getattr(node.extra_fields, "alloc_size", None)
        if size is not None and node.tag.name == "Allocation":
            events.append((node.start_time_ns, int(size)))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    if not events:
        raise RuntimeError("torch.profiler recorded no CPU allocation: the peak memory cannot be measured "
                           "(KINETO_LOG_LEVEL=0 shows the profiler's own messages)")
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def peak_bytes(fn: Callable[[], Any], live_before: int, device: torch.device) -> int:
    """Peak bytes alive while `fn` runs: `live_before` + the largest rise above the start."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return live_before + torch.cuda.max_memory_allocated(device) - start
    return live_before + cpu_allocation_peak(fn)
