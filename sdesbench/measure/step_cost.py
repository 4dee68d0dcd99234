"""What one training step costs: time (relative to the student, on a noisy machine), peak memory, FLOPs.

Every measurement runs `engine.step.train_step` on a `Learner` built as the Trainer builds one
(random weights; a random frozen teacher for methods that need one), on one fixed batch.

Time ratios are measured interleaved: each round times a block of the reference (the student),
then a block of each method in turn, with a reference block between every two methods, and each
method's ratio in a round is its block time over the mean of the two reference blocks around it.
Drift of the machine's speed during the measurement then moves both sides of a ratio alike. The
reported ratio is the median over rounds with a distribution-free confidence interval for that
median (order statistics of the per-round ratios, binomial coverage); a ratio whose interval
contains 1 is flagged "not distinguishable" from the student. On CPU the clock is the process's
CPU time (all threads, unaffected by other processes' use of the cores), on CUDA synchronised
wall time.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from sdesbench.engine import step
from sdesbench.engine.cost import count_flops
from sdesbench.engine.step import Learner
from sdesbench.measure.memory import peak_bytes, tensor_bytes
from sdesbench.methods.base import StepInfo

Clock = Literal["process", "wall"]


class StepBench:
    """One learner's training step on a fixed batch."""

    def __init__(self, learner: Learner, images: torch.Tensor, labels: torch.Tensor, total_iters: int = 1000):
        self.learner = learner
        self.images, self.labels = learner.runtime.to_device(images, labels)
        self.total_iters = total_iters
        self.iteration = 0
        learner.unit.train()

    def step(self) -> None:
        # the iteration stays inside the schedule: staged methods (warm-ups) keep their late-step form
        info = StepInfo(min(self.iteration, self.total_iters - 1), self.total_iters)
        step.train_step(self.learner, self.images, self.labels, info)
        self.iteration += 1

    def block(self, steps: int, clock: Clock) -> float:
        """Seconds per step over `steps` steps."""
        now = time.process_time if clock == "process" else time.perf_counter
        self.learner.runtime.synchronize()
        t0 = now()
        for _ in range(steps):
            self.step()
        self.learner.runtime.synchronize()
        return (now() - t0) / steps

    def live_bytes(self) -> int:
        """Parameters, buffers, gradients, optimizer state, teacher and batch: what a step starts with."""
        unit, learner = self.learner.plain_unit, self.learner
        tensors = list(unit.parameters()) + list(unit.buffers()) + [self.images, self.labels]
        tensors += [p.grad for p in unit.parameters()]
        tensors += [v for s in learner.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        if learner.teacher is not None:
            tensors += list(learner.teacher.parameters()) + list(learner.teacher.buffers())
        return tensor_bytes(tensors)

    def peak_memory_bytes(self) -> int:
        # gradients are dropped first (as the step's own zero_grad would): on CPU the profiler cannot
        # size frees of blocks allocated before it started, so every free it sees must have a known size
        self.learner.optimizer.zero_grad(set_to_none=True)
        return peak_bytes(self.step, self.live_bytes(), self.learner.runtime.device)

    def flops(self) -> int:
        return count_flops(self.step)


@dataclass
class RatioEstimate:
    """A method's step time relative to the reference, over interleaved rounds."""

    ratio: float  # median of the per-round ratios
    low: float  # confidence interval for that median
    high: float
    coverage: float  # the interval's actual coverage (order statistics give discrete levels)
    step_s: float  # median seconds per step of the method
    per_round: list[float] = field(default_factory=list)

    @property
    def distinguishable(self) -> bool:
        return not self.low <= 1.0 <= self.high


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): the widest-needed order statistics x_(k), x_(n+1-k) whose interval
    covers the median with probability >= `confidence` (binomial(n, 1/2) tails); with too few
    values for that level, the whole range and its coverage 1 - 2^(1-n)."""
    xs = sorted(values)
    n = len(xs)
    if n == 1:
        return xs[0], xs[0], 0.0
    tail = 0.0  # P(Binomial(n, 1/2) <= k - 1)
    k = 0
    while k + 1 <= n // 2:
        next_tail = tail + math.comb(n, k) / 2**n
        if 1 - 2 * next_tail < confidence:
            break
        tail, k = next_tail, k + 1
    if k == 0:
        return xs[0], xs[-1], 1 - 2 / 2**n
    return xs[k - 1], xs[n - k], 1 - 2 * tail


def interleaved_ratios(benches: dict[str, StepBench], reference: str, rounds: int, steps: int, warmup: int,
                       clock: Clock, log: Callable[[str], None] = lambda m: None) -> dict[str, RatioEstimate]:
    """Step time of every bench relative to `reference`, measured interleaved (module docstring)."""
    for name, b in benches.items():
        for _ in range(warmup):
            b.step()
    ref = benches[reference]
    others = [n for n in benches if n != reference]
    ratios: dict[str, list[float]] = {n: [] for n in others}
    times: dict[str, list[float]] = {n: [] for n in benches}
    for r in range(rounds):
        order = others if r % 2 == 0 else others[::-1]  # no method always follows the same neighbour
        before = ref.block(steps, clock)
        times[reference].append(before)
        for name in order:
            t = benches[name].block(steps, clock)
            after = ref.block(steps, clock)
            times[name].append(t)
            times[reference].append(after)
            ratios[name].append(t / ((before + after) / 2))
            before = after
        log(f"round {r + 1}/{rounds}")
    out = {reference: RatioEstimate(1.0, 1.0, 1.0, 1.0, statistics.median(times[reference]), [1.0] * rounds)}
    for name in others:
        low, high, coverage = median_interval(ratios[name])
        out[name] = RatioEstimate(statistics.median(ratios[name]), low, high, coverage,
                                  statistics.median(times[name]), ratios[name])
    return out
