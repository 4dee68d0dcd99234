"""`sdesbench doctor`: can this machine run the suite, in which precisions, and how fast?

Every check runs the suite's own code: learners built as the Trainer builds them
(`engine.step.random_learner`), the one training step (`engine.step.train_step`), the Trainer and
evaluation for DDP, `measure.step_cost.StepBench` and `measure.bench` for speed, memory and FLOP/s.

1. **Environment**: Python, torch, CUDA, cuDNN and NCCL versions, the GPUs (name, memory, bf16),
   free disk in the results folder, and for each backbone whether its ImageNet weights can be
   found without network (Hugging Face / torch hub cache, or a file given with `weights`), with the
   line that says how to provide them when they cannot (missing weights are reported, not failed:
   only the `paper` presets need them).
2. **Training in every precision**: every method on DeepLabV3-ResNet-18, and the student on every
   model, for a few training steps on the built-in data, in each precision the device supports
   (`precisions`): fp32, bf16 autocast, fp16 autocast + GradScaler, each with and without
   channels_last on CUDA; fp32 only on CPU. Every loss term of every step must be finite, the weights
   finite after the steps, and each term of the first step (same weights, same batch, same random
   state, dropout off) within `tolerance` of the fp32 reference. `torch.compile` is checked on one
   method.
3. **DDP**: with two GPUs or more (or on a CPU-only machine, with gloo), a 2-process run whose
   evaluation must equal the single-process evaluation of the checkpoint it wrote.
4. **Speed**: the student's training step at the paper protocol (batch 8, 512 x 512 crops on CUDA;
   scaled down on CPU), images/s, peak memory, the fraction of the device's peak FLOP/s, and the wall
   time of each table's `paper` preset (one seed) with every local GPU training a run.

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

import json
import math
import os
import platform
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp
from torch import nn

from sdesbench.config import TrainConfig
from sdesbench.data.base import EvalView, class_pixel_counts
from sdesbench.data.tiny import TinyScenes
from sdesbench.engine import step
from sdesbench.engine.configure import build_config
from sdesbench.engine.evaluate import evaluate
from sdesbench.engine.runtime import Runtime, pick_device
from sdesbench.errors import ConfigError, SdesbenchError
from sdesbench.experiments.launch import train_in_process_group
from sdesbench.experiments.spec import list_tables, load_spec
from sdesbench.io import load_checkpoint
from sdesbench.measure.bench import estimate_tables, fixed_batch, peak_flops
from sdesbench.measure.step_cost import StepBench
from sdesbench.methods import METHODS
from sdesbench.methods.base import StepInfo
from sdesbench.models import MODELS, build_model
from sdesbench.models.deeplabv3 import BACKBONES, cached_weights, create_timm
from sdesbench.registry import did_you_mean

REFERENCE_MODEL = "deeplabv3_resnet18"
COMPILED_METHOD = "sdes"  # the paper's method: experts, attention maps and KL all go through the compiled student
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "tf32": 2.0 ** -11, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
CONFIDENCE = 4.0  # lambda: P(error > bound) <= 2 exp(-lambda^2 / 2) per rounding model, 7e-4 at 4
SMALL_TERM = 1e-3  # terms below this fraction of the total are compared at this fraction of the total


class CheckFailed(SdesbenchError):
    """At least one check failed (exit status 1); the message names the first failure."""

    exit_code = 1


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
    """What the device supports: fp32 on CPU; fp32, bf16 (where supported) and fp16, each with and
    without channels_last, on CUDA."""
    if device.type != "cuda":
        return [Precision("fp32")]
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


# ----------------------------------------------------------------------------- training checks


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
            values = {name: float(v.detach()) for name, v in terms.items()}
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


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, cfg_dict: dict[str, Any], cwd: str) -> None:
    """One process of the doctor's DDP run (the environment torchrun would set)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    train_in_process_group(cfg_dict, cwd)


def check_ddp(device: torch.device, world: int = 2, iters: int = 2, images: int = 7) -> dict[str, Any]:
    """A `world`-process run (nccl on CUDA, one GPU each; gloo on CPU) whose recorded evaluation must
    equal the single-process evaluation of the checkpoint it wrote (`images` odd: the ranks' shares
    differ)."""
    t0 = time.perf_counter()
    backend = "nccl" if device.type == "cuda" else "gloo"
    result: dict[str, Any] = {"backend": backend, "processes": world, "passed": False}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = build_config({}, [f"train.iters={iters}", "data.batch_size=2", "data.crop=32",
                                f"eval.max_images={images}", f"train.device={device.type}", f"output.dir={out}",
                                "train.checkpoint_every=1000"])
        try:
            mp.start_processes(_ddp_rank, args=(world, _free_port(), cfg.to_dict(), os.getcwd()), nprocs=world,
                               join=True, start_method="spawn")
            record = load_checkpoint(out / "checkpoints" / "last.pt")
            recorded = json.loads((out / "results.json").read_text())
            model = build_model(cfg.model, record["num_classes"])
            model.load_state_dict(record["model"])
            single = evaluate(model.to(device), EvalView(TinyScenes(None, "val"), images), record["num_classes"],
                              device)["student"]
        except Exception as e:  # noqa: BLE001 - reported as this check's failure
            result["failure"] = f"DDP ({backend}, {world} processes): raised {type(e).__name__}: " \
                                f"{(str(e).strip().splitlines() or [''])[0][:200]}"
            return result
    same = (recorded["metrics"]["miou"] == single["miou"] and recorded["metrics"]["pixel_acc"] == single["pixel_acc"]
            and list(recorded["per_class_iou"].values()) == single["per_class_iou"])
    result.update(passed=bool(same and recorded.get("world_size") == world), miou_ddp=recorded["metrics"]["miou"],
                  miou_single=single["miou"], world_size=recorded.get("world_size"),
                  seconds=round(time.perf_counter() - t0, 1))
    if not result["passed"]:
        result["failure"] = (f"DDP ({backend}, {world} processes): recorded mIoU {recorded['metrics']['miou']!r} "
                             f"!= single-process evaluation of its checkpoint {single['miou']!r}")
    return result


# ----------------------------------------------------------------------------- speed


def paper_protocols() -> list[tuple[int, int]]:
    """Distinct (batch, square crop) of the tables' `paper` presets."""
    found = set()
    for table in list_tables():
        spec = load_spec(table)
        if "paper" in spec.presets:
            data = spec.preset_settings("paper").get("data", {})
            crop = data.get("crop", [512, 512])
            found.add((int(data.get("batch_size", 8)), int(crop[0] if isinstance(crop, list) else crop)))
    return sorted(found)


def measure_speed(device: torch.device, models: list[str], quick: bool, log: Callable[[str], None],
                  peak_tflops: float | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the student's step at each paper protocol per model and precision, each table's wall time)."""
    cuda = device.type == "cuda"
    protocols = paper_protocols()
    # on CPU a 512 x 512 batch of 8 takes minutes a step: measure smaller and scale by pixels
    measured_at = protocols if cuda else [(2, 64)] if quick else [(4, 128)]
    names = ["fp32"] + (["bf16"] if cuda and torch.cuda.is_bf16_supported() else [])
    rows, student_step = [], {}
    for batch, crop in measured_at:
        images, labels = fixed_batch(TinyScenes(None, "train", size=(crop, crop)), batch, crop)
        for model in models:
            for name in names:
                log(f"speed: {model} {name} batch {batch} crop {crop}")
                runtime = Runtime(device, Precision(name).amp)
                try:
                    bench = StepBench(step.random_learner(model, "student", TinyScenes.num_classes, runtime=runtime),
                                      images, labels)
                    for _ in range(2):
                        bench.step()
                    step_s = bench.block(2 if quick else 5, "wall")
                    memory, flops = bench.peak_memory_bytes(), bench.flops()
                except Exception as e:  # noqa: BLE001 - e.g. out of memory for one model: reported, not fatal
                    rows.append({"model": model, "precision": name, "batch": batch, "crop": crop,
                                 "note": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"})
                    continue
                peak = peak_flops(runtime, peak_tflops)
                rows.append({"model": model, "precision": name, "batch": batch, "crop": crop,
                             "step_ms": round(1e3 * step_s, 2), "images_per_s": round(batch / step_s, 2),
                             "peak_memory_mb": round(memory / 2**20, 1),
                             "tflops_per_s": round(flops / step_s / 1e12, 3),
                             "peak_flops_fraction": round(flops / step_s / peak, 4) if peak else None})
                if name == "fp32":
                    student_step[model] = (step_s, batch, crop)
                del bench
                if cuda:
                    torch.cuda.empty_cache()
    if REFERENCE_MODEL not in student_step:
        return rows, []
    ref_s, batch, crop = student_step[REFERENCE_MODEL]
    slots = max(1, torch.cuda.device_count()) if cuda else 1
    tables = estimate_tables({"student": ref_s}, batch, crop, REFERENCE_MODEL, slots,
                             {m: s for m, (s, b, c) in student_step.items() if (b, c) == (batch, crop)})
    for t in tables:
        if not cuda:
            t["note"] = t.get("note", "") + f"; measured at batch {batch} crop {crop} and scaled by pixels"
    return rows, tables


# ----------------------------------------------------------------------------- environment


def weights_status(weights: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Per backbone: where its ImageNet weights are (a given file that loads, or the offline cache), or
    the one line that says how to provide them."""
    rows = []
    for model, timm_name in BACKBONES.items():
        given = (weights or {}).get(timm_name)
        row: dict[str, Any] = {"model": model, "backbone": timm_name, "found": False, "where": None, "hint": None}
        if given:
            try:
                create_timm(timm_name, True, given, features_only=True)
                row.update(found=True, where=given)
            except SdesbenchError as e:
                row["hint"] = str(e)
        else:
            where = cached_weights(timm_name)
            row.update(found=where is not None, where=where)
        if not row["found"] and not row["hint"]:
            row["hint"] = (f"{timm_name}: no ImageNet weights here; on a machine with network run `python -c \"import "
                           f"timm; timm.create_model('{timm_name}', pretrained=True)\"` and copy ~/.cache/huggingface "
                           f"here, or pass --set model.weights=/path/{timm_name}.pth")
        rows.append(row)
    return rows


def environment(device: torch.device, results: Path) -> dict[str, Any]:
    import timm
    import torchvision

    folder = Path(results).resolve()
    while not folder.exists():
        folder = folder.parent
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": None, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpus": [], "bf16": False, "results_folder": str(folder),
        "free_disk_gb": round(shutil.disk_usage(folder).free / 2**30, 1),
    }
    if torch.cuda.is_available():
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - a build without NCCL: reported as absent
            env["nccl"] = None
        env["bf16"] = torch.cuda.is_bf16_supported()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                                "capability": f"{p.major}.{p.minor}"})
    return env


# ----------------------------------------------------------------------------- all of it


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
        compiled = check_training(COMPILED_METHOD, REFERENCE_MODEL, device, probe, steps, [Precision("fp32")],
                                  compiled=True)
        checks += compiled
        result["compile"] = {"method": COMPILED_METHOD, "model": REFERENCE_MODEL,
                             "passed": all(c.passed for c in compiled)}
    result["checks"] = [asdict(c) | {"label": c.label} for c in checks]
    gpus = torch.cuda.device_count() if cuda else 0
    if s.quick:
        result["ddp"] = {"skipped": "--quick"}
    elif cuda and gpus < 2:
        result["ddp"] = {"skipped": f"needs 2 GPUs, this machine has {gpus}"}
    elif not cuda and torch.cuda.is_available():
        result["ddp"] = {"skipped": "--device cpu on a CUDA machine (the process group would use nccl)"}
    else:
        log("ddp: 2 processes")
        result["ddp"] = check_ddp(device)
    if s.speed:
        result["speed"], result["tables"] = measure_speed(device, [REFERENCE_MODEL] if s.quick or not cuda else models,
                                                          s.quick, log, s.peak_tflops)
    failures = [c.failure for c in checks if not c.passed]
    if result["ddp"].get("failure"):
        failures.append(result["ddp"]["failure"])
    result["failures"] = failures
    result["passed"] = not failures
    return result
