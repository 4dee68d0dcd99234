"""The precision matrix of `sdesbench doctor`: a few training steps of a method on a model in every
precision the device supports (fp32, bf16 autocast, fp16 autocast + GradScaler, with and without
channels_last on CUDA; fp32 and bf16 on CPU), every loss term finite, the weights finite after the steps, and
each term of the first step within `tolerance` of the eager fp32 step; and the same check under
`torch.compile` (`check_compile`).

The tolerance (derivation in docs/performance.md): autocast rounds the inputs and weights of every
convolution / linear layer to the low-precision format and its output too (three roundings of
relative size u, the format's unit roundoff), and accumulates in fp32 (K products, K the layer's
fan-in, rounding at fp32's u32). Rounding errors behave as independent zero-mean variables, so over
D layers the relative error of the network's output is, with high probability, below
lambda * (u * sqrt(3 D) + u32 * sqrt(D K)) (Higham & Mary 2019, probabilistic rounding error analysis,
lambda = 4). Loss terms are computed in fp32 from those outputs and, on random-init networks, are O(1)
functions of O(1) values, so they inherit that relative error. A term below 1e-3 of the total loss is
compared with 1e-3 x the total instead of its own size: its relative error is meaningless near zero,
and its effect on training is bounded by the total's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sdesbench.config import TrainConfig
from sdesbench.data.base import class_pixel_counts
from sdesbench.data.tiny import TinyScenes
from sdesbench.engine import step
from sdesbench.engine.runtime import Runtime
from sdesbench.measure.bench import fixed_batch
from sdesbench.methods.base import StepInfo

REFERENCE_MODEL = "deeplabv3_resnet18"  # every method is checked on it (and the speed measured)
COMPILED_METHOD = "sdes"  # the paper's method: experts, attention maps and KL all go through the compiled student
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "tf32": 2.0 ** -11, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
CONFIDENCE = 4.0  # lambda: P(error > bound) <= 2 exp(-lambda^2 / 2) per rounding model, 7e-4 at 4
SMALL_TERM = 1e-3  # terms below this fraction of the total are compared at this fraction of the total


@dataclass(frozen=True)
class Precision:
    """One way to run a step: autocast dtype (None = fp32) and memory layout."""

    name: str  # fp32 | bf16 | fp16
    channels_last: bool = False

    @property
    def amp(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    @property
    def label(self) -> str:
        return self.name + (" + channels_last" if self.channels_last else "")

    def rounding_format(self, device: torch.device) -> str:
        """The format convolutions round to: fp32 runs them in TF32 on CUDA when torch allows it."""
        if self.name == "fp32" and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
            return "tf32"
        return self.name


def precisions(device: torch.device) -> list[Precision]:
    """What the device supports: fp32 and bf16 autocast on CPU (torch autocasts to bf16 on any CPU; so a
    machine without a GPU, CI's, still exercises every method's half-precision path); fp32, bf16 (where
    supported) and fp16, each with and without channels_last, on CUDA."""
    if device.type != "cuda":
        return [Precision("fp32"), Precision("bf16")]
    names = ["fp32"] + (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]
    return [Precision(n, cl) for n in names for cl in (False, True)]


def network_shape(modules: list[nn.Module]) -> tuple[int, int]:
    """(D, K): convolution and linear layers in `modules` (an upper bound on the layers any path goes
    through: parallel branches and unused layers count too) and their largest fan-in."""
    depth, fan_in = 0, 1
    for m in (sub for mod in modules for sub in mod.modules()):
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            depth += 1
            fan_in = max(fan_in, m.weight[0].numel())
    return depth, fan_in


def tolerance(fmt: str, depth: int, fan_in: int) -> float:
    """Relative tolerance of a loss term computed in `fmt` against fp32 (module docstring)."""
    u, u32 = UNIT_ROUNDOFF[fmt], UNIT_ROUNDOFF["fp32"]
    return CONFIDENCE * (u * math.sqrt(3 * depth) + u32 * math.sqrt(depth * fan_in))


@dataclass
class StepCheck:
    """A few training steps of one method on one model in one precision."""

    method: str
    model: str
    precision: str
    channels_last: bool = False
    compiled: bool = False
    passed: bool = True
    steps: int = 0
    terms: dict[str, float | str] = field(default_factory=dict)  # first step ('nan', 'inf' as text)
    reference: dict[str, float | str] = field(default_factory=dict)  # fp32 first step
    layers: int = 0  # D and K of the tolerance (`network_shape`)
    fan_in: int = 1
    tolerance: float | None = None
    worst: float | None = None  # largest |term - reference| / allowed (<= 1 passes)
    failure: str | None = None
    seconds: float = 0.0

    @property
    def label(self) -> str:
        extra = (" + channels_last" if self.channels_last else "") + (" + torch.compile" if self.compiled else "")
        return self.precision + extra

    def fail(self, what: str, term: str | None = None) -> None:
        self.passed = False
        where = f"method {self.method} on {self.model}, precision {self.label}"
        self.failure = f"{where}: term '{term}' {what}" if term else f"{where}: {what}"



@dataclass
class Probe:
    """The fixed batch and class counts every training check uses."""

    images: torch.Tensor
    labels: torch.Tensor
    counts: torch.Tensor
    num_classes: int


def make_probe(batch: int, crop: int) -> Probe:
    train = TinyScenes(None, "train")
    images, labels = fixed_batch(train, batch, crop)
    return Probe(images, labels, class_pixel_counts(train), train.num_classes)


def run_steps(method: str, model: str, precision: Precision, device: torch.device, probe: Probe, steps: int,
              compiled: bool = False, first_only: bool = False) -> tuple[StepCheck, list[dict[str, float]]]:
    """Train `steps` steps (a schedule of `steps` iterations; only its first with `first_only`) from
    seeded random weights; the check (finite terms and weights) and the terms of every step."""
    check = StepCheck(method, model, precision.name, precision.channels_last, compiled, steps=steps)
    runtime = Runtime(device, precision.amp, precision.channels_last and device.type == "cuda")
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    try:
        learner = step.random_learner(model, method, probe.num_classes, runtime=runtime,
                                      train=TrainConfig(iters=steps, compile=compiled),
                                      class_pixel_counts=lambda: probe.counts)
        learner.unit.train()
        shapes = [network_shape([learner.plain_unit])]
        if learner.teacher is not None:
            shapes.append(network_shape([learner.teacher]))
        check.layers, check.fan_in = max(d for d, _ in shapes), max(k for _, k in shapes)
        torch.manual_seed(1)  # any sampling in a method: the same for every precision
        dropout = [m for m in learner.plain_unit.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
        for k in range(1 if first_only else steps):
            # the compared first step runs without dropout: its masks differ between eager and compiled
            # code (inductor draws its own random numbers) and may differ between dtypes on CUDA
            for m in dropout:
                m.train(k > 0)
            terms = step.train_step(learner, probe.images, probe.labels, StepInfo(k, steps))
            values = {name: float(v.detach()) for name, v in {**terms, **learner.own_terms}.items()}
            history.append(values)
            bad = [name for name, v in values.items() if not math.isfinite(v)]
            if bad:
                check.fail(f"is {values[bad[0]]} at step {k + 1}", bad[0])
                break
        else:
            if not all(bool(torch.isfinite(p).all()) for p in learner.plain_unit.parameters()):
                check.fail(f"weights are not finite after {len(history)} steps")
    except Exception as e:  # noqa: BLE001 - any error of any method is this check's result, not doctor's end
        check.fail(f"raised {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")
    check.seconds = round(time.perf_counter() - t0, 2)
    if history:
        check.terms = {k: v if math.isfinite(v) else str(v) for k, v in history[0].items()}
    return check, history


def compare(check: StepCheck, reference: dict[str, Any], rtol: float) -> None:
    """First-step terms against the fp32 reference: |t - r| <= rtol * max(|r|, SMALL_TERM * total)."""
    check.reference, check.tolerance = dict(reference), rtol
    if not check.passed or not reference:
        return
    total = sum(abs(float(v)) for v in reference.values())
    ratios = {}
    for name, ref in reference.items():
        if name not in check.terms:
            check.fail("is missing (the fp32 step has it)", name)
            return
        ref, got = float(ref), float(check.terms[name])
        allowed = rtol * max(abs(ref), SMALL_TERM * total)
        ratios[name] = abs(got - ref) / allowed if allowed > 0 else (0.0 if got == ref else math.inf)
    name = max(ratios, key=ratios.get)
    check.worst = round(ratios[name], 4)
    if ratios[name] > 1:
        ref, got = float(reference[name]), float(check.terms[name])
        check.fail(f"= {got:.6g} differs from fp32's {ref:.6g} by {abs(got - ref) / max(abs(ref), 1e-30):.2%} "
                   f"(tolerance {rtol:.2%} of max(|fp32|, {SMALL_TERM:g} x total))", name)


def reference_terms(method: str, model: str, device: torch.device, probe: Probe,
                    steps: int) -> tuple[StepCheck, dict[str, Any]]:
    """The eager fp32 first-step terms (of a `steps`-iteration schedule), with TF32 off on CUDA: the
    reference of every precision."""
    allow = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        check, _ = run_steps(method, model, Precision("fp32"), device, probe, steps, first_only=True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allow
    check.precision = "fp32 reference (TF32 off)" if device.type == "cuda" else "fp32 reference"
    return check, check.terms


def check_training(method: str, model: str, device: torch.device, probe: Probe, steps: int,
                   variants: list[Precision], compiled: bool = False) -> list[StepCheck]:
    """Every precision of `variants` for one method and model, each compared with the eager fp32 step.
    On CPU the fp32 variant is that reference itself; on CUDA (TF32) and for compiled or
    low-precision-only checks the reference is one more step."""
    fp32 = Precision("fp32")
    reuse = device.type != "cuda" and not compiled and fp32 in variants
    reference: dict[str, Any] = {}
    if not reuse:
        ref_check, reference = reference_terms(method, model, device, probe, steps)
        if not ref_check.passed:
            return [ref_check]
    checks = []
    for precision in sorted(variants, key=lambda p: p != fp32):  # fp32 first
        check, _ = run_steps(method, model, precision, device, probe, steps, compiled)
        if reuse and precision == fp32:
            reference = dict(check.terms)
        compare(check, reference, tolerance(precision.rounding_format(device), check.layers, check.fan_in))
        checks.append(check)
    return checks


def check_compile(device: torch.device, probe: Probe, steps: int) -> tuple[list[StepCheck], dict[str, Any]]:
    """`COMPILED_METHOD` on the reference model in fp32 under `torch.compile`, against the eager step:
    (the checks, the report's `compile` entry)."""
    compiled = check_training(COMPILED_METHOD, REFERENCE_MODEL, device, probe, steps, [Precision("fp32")],
                              compiled=True)
    return compiled, {"method": COMPILED_METHOD, "model": REFERENCE_MODEL, "passed": all(c.passed for c in compiled)}
