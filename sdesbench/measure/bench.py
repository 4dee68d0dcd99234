"""`sdesbench bench`: how fast and how memory-hungry each method's training step is.

A benchmark, not a test. Everything runs in one process on one device, through the suite's own
training step (`engine.step.train_step`) on learners built as the Trainer builds them:

- **training step** of each method asked for (`DEFAULT_METHODS`, a representative handful, unless `methods`
  names others or `all`) relative to `student`, measured interleaved over
  rounds, with the median ratio, its confidence interval and a "not distinguishable" flag
  (`measure/step_cost.py`). Methods that need a teacher get a random teacher of the student's
  architecture, built in memory.
- **peak memory** of one training step (`measure/memory.py`: CUDA allocator, or the CPU allocation
  events replayed), counting only this method's state and activations.
- **FLOPs** of one step (`FlopCounterMode`), the FLOP/s reached, and on CUDA the fraction of the
  device's peak (a table of vendor dense peaks; `--peak-tflops` overrides).
- **evaluation** throughput (the model alone, the metric's share, and the whole evaluation with its
  loader workers) and **data loader** throughput (`measure/throughput.py`).
- **paper tables**: the wall time of each `experiments/*.yaml` table's `paper` preset on this device,
  estimated as iterations x the method's step time, scaled by batch x crop pixels.
- **class count**: the pieces of evaluation, SDES and the dataset checks whose work grows with the
  number of classes, at the dataset's class count and at 171 (COCO-Stuff-164K; `measure/class_scaling.py`).
"""
from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from sdesbench.config import TrainConfig
from sdesbench.data import DATASETS
from sdesbench.data.base import IterationSampler, SegDataset, TrainView, class_pixel_counts
from sdesbench.engine.configure import build_config
from sdesbench.engine.runtime import Runtime
from sdesbench.engine.step import random_learner
from sdesbench.errors import ConfigError, SdesbenchError
from sdesbench.experiments.plan import Sweep, makespan
from sdesbench.experiments.spec import list_tables
from sdesbench.measure.class_scaling import class_scaling, format_class_scaling
from sdesbench.measure.step_cost import Clock, StepBench, interleaved_ratios
from sdesbench.measure.throughput import eval_throughput, loader_throughput
from sdesbench.methods import METHODS

# Dense (no sparsity) peak FLOP/s from vendor data sheets, by device-name substring (first match wins).
# fp32 training on CUDA runs convolutions in TF32 (torch's default for cuDNN), hence the tf32 column.
PEAK_TFLOPS = [
    ("H100 PCIe", {"bf16": 756, "fp16": 756, "tf32": 378}),
    ("H100", {"bf16": 989, "fp16": 989, "tf32": 494}),
    ("H200", {"bf16": 989, "fp16": 989, "tf32": 494}),
    ("A100", {"bf16": 312, "fp16": 312, "tf32": 156}),
    ("L40S", {"bf16": 362, "fp16": 362, "tf32": 183}),
    ("A10", {"bf16": 125, "fp16": 125, "tf32": 62.5}),
    ("V100", {"bf16": 0, "fp16": 125, "tf32": 15.7}),
    ("T4", {"bf16": 0, "fp16": 65, "tf32": 8.1}),
    ("RTX 4090", {"bf16": 165, "fp16": 165, "tf32": 82.6}),
]


# what `bench` times with no `--methods`: one of each kind of cost (the student; logit KD; attention and channel
# feature KD with their adapters; CIRKD's memory queues and pairwise relations; SDES's experts). Timing all
# registered methods interleaved takes past 900 s on a loaded CPU: `--methods all` asks for it.
DEFAULT_METHODS = ("student", "kl", "at", "cwd", "cirkd", "sdes")


def bench_methods(asked: list[str] | None) -> list[str]:
    """The methods to time, the student first: `DEFAULT_METHODS` (None), every registered one (`["all"]`), or
    those named (each checked: one line with a did-you-mean)."""
    names = list(DEFAULT_METHODS) if not asked else METHODS.names() if asked == ["all"] else asked
    for m in names:
        METHODS.get(m)
    return ["student"] + [m for m in names if m != "student"]


@dataclass
class BenchSettings:
    model: str = "deeplabv3_resnet18"
    batch: int | None = None  # default: 8 on CUDA (the paper's), 4 on CPU
    crop: int | None = None  # default: 512 on CUDA (the paper's), 128 on CPU
    rounds: int = 6  # interleaved rounds (6 gives a 97% interval for the median ratio)
    steps: int = 2  # steps per timed block
    warmup: int = 2
    clock: Clock | None = None  # default: process CPU time on CPU, wall time on CUDA
    methods: list[str] | None = None  # None: DEFAULT_METHODS; ["all"]: every registered method
    dataset: str = "tiny"
    data_root: str | None = None
    workers: int = 0
    loader_batches: int = 20
    eval_images: int = 10
    eval_batch: int = 1  # images per evaluation batch (equal sizes only), with `workers` loader workers
    device: str = "auto"
    amp: str = "auto"
    peak_tflops: float | None = None
    tables: bool = True
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> options (default: its defaults)


def peak_flops(runtime: Runtime, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if runtime.device.type != "cuda":
        return None
    name = runtime.device_name
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(runtime.amp, "tf32")
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in name and peaks.get(key):
            return peaks[key] * 1e12
    return None


def fixed_batch(dataset: SegDataset, batch: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    view = TrainView(dataset, [crop, crop], [0.5, 2.0], True)
    loader = DataLoader(view, batch_size=batch, sampler=IterationSampler(len(view), batch, 1, seed=0))
    return next(iter(loader))


def estimate_tables(step_s: dict[str, float], batch: int, crop: int, model: str, slots: int = 1,
                    model_step_s: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Wall time of each table's `paper` preset (one seed) from measured step times (at `batch` x `crop`,
    scaled by each run's batch x crop pixels): a run costs its model's student step
    (`model_step_s`, else the student's of `model`) times its method's step over the student's
    (`step_s`, 1 when unmeasured). `hours` is the sum (one device); `hours_on_slots` the wall time
    when `slots` runs train at once, scheduled as `sdesbench run --gpus` schedules them."""
    out = []
    student = step_s["student"]
    per_model = model_step_s or {}
    for table in list_tables():
        with tempfile.TemporaryDirectory() as tmp:
            sweep = Sweep(table, "paper", (0,), Path(tmp))
            spec = sweep.spec()
            if "paper" not in spec.presets:
                continue
            plans = sweep.plans(spec)
        runs = {str(p.out): p for p in plans if p.cfg is not None}
        durations, unmeasured = [], set()
        for p in runs.values():
            c = p.cfg
            scale = (c.data.batch_size * c.data.crop[0] * c.data.crop[1]) / (batch * crop * crop)
            if c.method.name not in step_s:
                unmeasured.add(c.method.name)
            factor = step_s.get(c.method.name, student) / student
            durations.append(c.train.iters * per_model.get(c.model.name, student) * factor * scale)
        skipped = sum(1 for p in plans if p.cfg is None)
        if not runs:
            out.append({"table": table, "note": f"not estimated: none of its {skipped} rows can run"})
            continue
        notes = [f"models not measured costed as {model}" if per_model else f"every model costed as {model}"]
        if len(step_s) == 1:
            notes.append("every method costed as the student")
        elif unmeasured:
            notes.append(f"{', '.join(sorted(unmeasured))} costed as student")
        out.append({"table": table, "runs": len(runs), "iterations": sum(p.cfg.train.iters for p in runs.values()),
                    "hours": round(sum(durations) / 3600, 2), "slots": slots,
                    "hours_on_slots": round(makespan(list(runs.values()), durations, slots) / 3600, 2),
                    "rows_not_runnable": skipped, "note": "; ".join(notes)})
    return out


def run_bench(s: BenchSettings, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    runtime = Runtime.create(s.device, s.amp)
    cuda = runtime.device.type == "cuda"
    batch = s.batch or (8 if cuda else 4)
    crop = s.crop or (512 if cuda else 128)
    clock: Clock = s.clock or ("wall" if cuda else "process")
    if cuda:
        torch.backends.cudnn.benchmark = True
    build_config({}, [f"model.name={s.model}", f"data.name={s.dataset}"])  # name checks, one-line errors
    ds_cls = DATASETS.get(s.dataset)
    train_set = ds_cls(s.data_root, "train")
    eval_set = ds_cls(s.data_root, "val" if "val" in ds_cls.splits else ds_cls.splits[-1])
    names = bench_methods(s.methods)
    counts = class_pixel_counts(train_set)
    images, labels = fixed_batch(train_set, batch, crop)

    benches: dict[str, StepBench] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        log(f"build {name}")
        try:
            learner = random_learner(s.model, name, ds_cls.num_classes, s.options.get(name), runtime, TrainConfig(),
                                     class_pixel_counts=lambda: counts)
            benches[name] = StepBench(learner, images, labels)
            benches[name].step()  # a method that cannot run here fails now, not in the middle of a round
        except (SdesbenchError, RuntimeError, ValueError) as e:  # reported per method, not fatal
            benches.pop(name, None)
            rows[name] = {"method": name, "note": f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    if "student" not in benches:
        raise ConfigError(f"the student could not be benchmarked: {rows['student']['note']}")
    log(f"timing {len(benches)} methods interleaved: {s.rounds} rounds of {s.steps} steps ({clock} clock)")
    ratios = interleaved_ratios(benches, "student", s.rounds, s.steps, s.warmup, clock, log)
    peak = peak_flops(runtime, s.peak_tflops)
    for name, b in benches.items():
        log(f"memory and FLOPs of {name}")
        r = ratios[name]
        mem, flops = b.peak_memory_bytes(), b.flops()
        row = {"method": name, "step_ms": round(1e3 * r.step_s, 2), "time_ratio": round(r.ratio, 3),
               "time_ratio_low": round(r.low, 3), "time_ratio_high": round(r.high, 3),
               "interval_coverage": round(r.coverage, 3), "distinguishable": r.distinguishable,
               "peak_memory_mb": round(mem / 2**20, 1), "images_per_s": round(batch / r.step_s, 3),
               "gflops_per_step": round(flops / 1e9, 2), "tflops_per_s": round(flops / r.step_s / 1e12, 4)}
        if peak:
            row["peak_flops_fraction"] = round(flops / r.step_s / peak, 4)
        if s.options.get(name):
            row["options"] = s.options[name]
        rows[name] = row
    ref = rows["student"]
    for row in rows.values():
        if "step_ms" in row:
            row["memory_ratio"] = round(row["peak_memory_mb"] / ref["peak_memory_mb"], 3)
    del benches
    if cuda:
        torch.cuda.empty_cache()
    log("bench evaluation")
    evaluation = eval_throughput(s.model, eval_set, s.eval_images, runtime, s.workers, s.eval_batch)
    log("bench data loader")
    loader = loader_throughput(train_set, (crop, crop), s.loader_batches * batch, workers=s.workers, batch_size=batch,
                               pin_memory=cuda)
    loader = {"workers": s.workers, "images_per_s": round(loader["images_per_s"], 3),
              "ratio_to_training_step": round(loader["images_per_s"] / ref["images_per_s"], 2)}
    log(f"bench class count ({ds_cls.num_classes} and 171 classes)")
    classes = class_scaling(ds_cls.num_classes, runtime, batch, crop, s.model)
    result: dict[str, Any] = {
        "device": runtime.device_name if cuda else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count()},
        "methods_timed": (f"a representative handful ({len(names)} of {len(METHODS.names())}); `--methods all` "
                          "times every one" if not s.methods else f"{len(names)} of {len(METHODS.names())}, as asked"),
        "settings": {"model": s.model, "dataset": s.dataset, "batch": batch, "crop": crop, "rounds": s.rounds,
                     "steps": s.steps, "warmup": s.warmup, "clock": clock, "amp": runtime.amp_name,
                     "memory_method": "torch.cuda allocator peak above the step's start + the method's live tensors"
                     if cuda else "torch.profiler allocation events + the method's live tensors"},
        "peak_tflops": round(peak / 1e12, 1) if peak else None,
        "methods": [rows[n] for n in names],
        "eval": evaluation,
        "data_loader": loader,
        "classes": classes,
    }
    if s.tables:
        step_s = {r["method"]: r["step_ms"] / 1e3 for r in rows.values() if "step_ms" in r}
        result["tables"] = estimate_tables(step_s, batch, crop, s.model)
    return result


def format_report(r: dict[str, Any]) -> str:
    """Markdown tables (for the terminal and for docs/performance.md)."""
    st = r["settings"]
    peak = bool(r.get("peak_tflops"))
    lines = [f"device: {r['device']}; model {st['model']}, batch {st['batch']}, crop {st['crop']}, amp {st['amp']}; "
             f"time ratios: median over {st['rounds']} interleaved rounds of {st['steps']} steps ({st['clock']} clock), "
             "[interval]; '~' = not distinguishable from the student", f"methods: {r['methods_timed']}", "",
             "| method | step ms | time × student | peak MB | memory × student | img/s | GFLOP/step | TFLOP/s |"
             + (" % of peak |" if peak else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if peak else "")]
    for m in r["methods"]:
        if "step_ms" not in m:
            lines.append(f"| {m['method']} | {m['note']} |")
            continue
        ratio = f"{m['time_ratio']:.3f} [{m['time_ratio_low']:.2f}, {m['time_ratio_high']:.2f}]"
        if m["method"] != "student" and not m["distinguishable"]:
            ratio += " ~"
        row = (f"| {m['method']} | {m['step_ms']:.1f} | {ratio} | {m['peak_memory_mb']:.1f} | "
               f"{m['memory_ratio']:.3f} | {m['images_per_s']:.2f} | {m['gflops_per_step']:.1f} | "
               f"{m['tflops_per_s']:.3f} |")
        if peak:
            row += f" {100 * m.get('peak_flops_fraction', float('nan')):.1f} |"
        lines.append(row)
    e, d = r["eval"], r["data_loader"]
    lines += ["", f"evaluation: {e['images_per_s']:.2f} img/s without the metric, {e['images_per_s_with_metric']:.2f} "
                  f"with it; metric accumulation adds {100 * e['metric_overhead']:.2f}% ({e['images']} images)",
              f"evaluation as runs do it (loader with {e['with_loader']['workers']} workers, batch "
              f"{e['with_loader']['batch_size']}): {e['with_loader']['images_per_s']:.2f} img/s end to end",
              f"data loader ({d['workers']} workers): {d['images_per_s']:.1f} img/s = "
              f"{d['ratio_to_training_step']:.1f}x what the student's training step consumes"]
    return "\n".join(lines + table_estimate_lines(r.get("tables", [])) + format_class_scaling(r["classes"]))


def table_estimate_lines(tables: list[dict[str, Any]]) -> list[str]:
    """One line per table of `estimate_tables`."""
    lines = []
    for t in tables:
        if "hours" not in t:
            lines.append(f"table {t['table']}: {t['note']}")
            continue
        at_once = f", ~{t['hours_on_slots']:.1f} h with {t['slots']} runs at once" if t.get("slots", 1) > 1 else ""
        lines.append(f"table {t['table']} (paper preset, 1 seed): {t['runs']} runs, {t['iterations']} iterations, "
                     f"~{t['hours']:.1f} h on one device{at_once} ({t['note']})")
    return lines
