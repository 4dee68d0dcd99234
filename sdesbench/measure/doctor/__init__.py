"""`sdesbench doctor`: can this machine run the suite, in which precisions, and how fast?

Every check runs the suite's own code: learners built as the Trainer builds them
(`engine.step.random_learner`), the one training step (`engine.step.train_step`), the Trainer and
evaluation for DDP, `measure.step_cost.StepBench` and `measure.bench` for speed, memory and FLOP/s.
`run_doctor` runs the checks in this order, one module each, and gathers their failures:

1. **Environment** (`environment`): Python, torch, CUDA, cuDNN and NCCL versions, the GPUs (name,
   memory, bf16), free disk in the results folder, and for each backbone whether its ImageNet weights
   can be found without network (Hugging Face / torch hub cache, or a file given with `weights`), with
   the line that says how to provide them when they cannot (missing weights are reported, not failed:
   only the `paper` presets need them).
2. **Training in every precision** (`precision`): every method on DeepLabV3-ResNet-18, and the student
   on every model, for a few training steps on the built-in data, in each precision the device
   supports (`precisions`): fp32, bf16 autocast, fp16 autocast + GradScaler, each with and without
   channels_last on CUDA; fp32 and bf16 autocast on CPU. Every loss term of every step must be finite, the weights
   finite after the steps, and each term of the first step (same weights, same batch, same random
   state, dropout off) within `tolerance` of the fp32 reference. `torch.compile` is checked on one
   method.
3. **DDP** (`ddp`): with two GPUs or more (or on a CPU-only machine, with gloo), a 2-process run whose
   evaluation must equal the single-process evaluation of the checkpoint it wrote.
4. **Speed** (`speed`): the student's training step at the paper protocol (batch 8, 512 x 512 crops on
   CUDA; scaled down on CPU), images/s, peak memory, the fraction of the device's peak FLOP/s, and the
   wall time of each table's `paper` preset (one seed) with every local GPU training a run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdesbench.engine.runtime import pick_device
from sdesbench.errors import ConfigError, SdesbenchError
from sdesbench.measure.doctor.ddp import ddp_entry
from sdesbench.measure.doctor.environment import environment, weights_status
from sdesbench.measure.doctor.precision import (COMPILED_METHOD, REFERENCE_MODEL, StepCheck, check_compile,
                                                check_training, make_probe, precisions)
from sdesbench.measure.doctor.speed import measure_speed
from sdesbench.methods import METHODS
from sdesbench.models import MODELS
from sdesbench.models.deeplabv3 import BACKBONES
from sdesbench.registry import did_you_mean


class CheckFailed(SdesbenchError):
    """At least one check failed (exit status 1); the message names the first failure."""

    exit_code = 1


@dataclass
class DoctorSettings:
    device: str = "auto"
    quick: bool = False
    methods: list[str] | None = None  # None: every registered method
    models: list[str] | None = None  # None: every registered model (with the student)
    results: Path = Path("results")
    weights: dict[str, str] = field(default_factory=dict)  # backbone -> weights file
    speed: bool = True
    peak_tflops: float | None = None


def run_doctor(s: DoctorSettings, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Every check of `s`, in order, `log` told what runs: the report (`failures`: the failed checks)."""
    device = pick_device(s.device)
    cuda = device.type == "cuda"
    methods = s.methods or METHODS.names()
    models = s.models or MODELS.names()
    for name in methods:
        METHODS.get(name)  # one-line error with a did-you-mean
    for name in models:
        MODELS.get(name)
    for backbone in s.weights:
        if backbone not in BACKBONES.values():
            raise ConfigError(f"--weights: unknown backbone {backbone!r}{did_you_mean(backbone, BACKBONES.values())}; "
                              f"known: {', '.join(BACKBONES.values())}")
    steps = 2 if s.quick else 3
    probe = make_probe(2 if not cuda else 4, 32 if s.quick and not cuda else 64)
    variants = precisions(device)
    result: dict[str, Any] = {"device": str(device), "quick": s.quick, "environment": environment(device, s.results),
                              "weights": weights_status(s.weights), "precisions": [p.label for p in variants],
                              "checks": []}
    checks: list[StepCheck] = []
    for method in methods:
        log(f"train: {method} on {REFERENCE_MODEL}")
        checks += check_training(method, REFERENCE_MODEL, device, probe, steps, variants)
    for model in models:
        if model != REFERENCE_MODEL or "student" not in methods:
            log(f"train: student on {model}")
            checks += check_training("student", model, device, probe, steps, variants)
    if s.quick:
        result["compile"] = {"skipped": "--quick"}
    else:
        log(f"train: {COMPILED_METHOD} on {REFERENCE_MODEL} with torch.compile")
        compiled, result["compile"] = check_compile(device, probe, steps)
        checks += compiled
    result["checks"] = [asdict(c) | {"label": c.label} for c in checks]
    result["ddp"] = ddp_entry(device, s.quick, log)
    if s.speed:
        result["speed"], result["tables"] = measure_speed(device, [REFERENCE_MODEL] if s.quick or not cuda else models,
                                                          s.quick, log, s.peak_tflops)
    failures = [c.failure for c in checks if not c.passed]
    if result["ddp"].get("failure"):
        failures.append(result["ddp"]["failure"])
    result["failures"] = failures
    result["passed"] = not failures
    return result
