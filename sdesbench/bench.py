"""`sdesbench bench`: how fast and how memory-hungry each method's training step is.

A benchmark, not a test: everything runs in one process on one device, with the Trainer's own
building blocks (the same TrainUnit, optimizer, autocast and GradScaler logic):

- **training step** (forward of teacher and student, loss terms, backward, SGD step) for every
  registered method, median over `iters` steps after `warmup` steps, on the same model, batch,
  crop and input batch; reported relative to `student`. Methods that need a teacher get a
  randomly initialised teacher of the student's architecture, built in memory.
- **peak memory** of one training step. CUDA: `torch.cuda.max_memory_allocated`. CPU: there is no
  allocator statistic, and the process's RSS never goes down, so a later method would inherit an
  earlier one's peak. Instead the step runs under `torch.profiler` with `profile_memory=True`,
  whose allocation events (every CPU allocation and free, with its size and time) are replayed
  in time order; the peak is the bytes alive before the step (parameters, gradients, optimizer
  state, buffers, teacher, input batch) plus the highest running sum of allocations during it.
- **FLOPs** of one step (`torch.utils.flop_counter.FlopCounterMode`), the FLOP/s reached, and on
  CUDA the fraction of the device's peak (a table of vendor dense peaks; `--peak-tflops` overrides).
- **evaluation**: whole-image inference over the evaluation split, timed apart from the metric
  accumulation (argmax + confusion-matrix update) in the same loop, so the metric's share is
  measured directly rather than as the difference of two noisy totals.
- **data loader**: images/s of the training stream (TrainView + IterationSampler, the configured
  workers) against the images/s the training step consumes.
- **paper tables**: the wall time of each `experiments/*.yaml` table's `paper` preset on this
  device, estimated as iterations x the method's step time, scaled by batch x crop pixels.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from sdesbench.config import build_config
from sdesbench.data.base import EvalView, IterationSampler, SegDataset, TrainView, class_pixel_counts
from sdesbench.engine.metrics import ConfusionMatrix, predict
from sdesbench.engine.trainer import amp_dtype, pick_device, random_init_unit
from sdesbench.errors import ConfigError
from sdesbench.methods.base import StepInfo
from sdesbench.models import build_model
from sdesbench.registry import DATASETS, METHODS

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


@dataclass
class BenchSettings:
    model: str = "deeplabv3_resnet18"
    batch: int | None = None  # default: 8 on CUDA (the paper's), 4 on CPU
    crop: int | None = None  # default: 512 on CUDA (the paper's), 128 on CPU
    iters: int = 10
    warmup: int = 3
    methods: list[str] | None = None  # None: every registered method
    dataset: str = "tiny"
    data_root: str | None = None
    workers: int = 0
    loader_batches: int = 20
    eval_images: int = 10
    device: str = "auto"
    amp: str = "auto"
    peak_tflops: float | None = None
    tables: bool = True
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> options (default: its defaults)
    notes: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def cpu_peak_bytes(fn: Callable[[], Any], live_before: int) -> int:
    """Peak bytes alive while `fn` runs on CPU: `live_before` + the highest running sum of the
    allocation events the profiler records (positive: allocated, negative: freed)."""
    from torch.profiler import ProfilerActivity, profile

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
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return live_before + peak


def peak_flops(device: torch.device, amp: torch.dtype | None, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "tf32")
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in name and peaks.get(key):
            return peaks[key] * 1e12
    return None


class StepBench:
    """One method's training step on a fixed input batch, built like the Trainer builds it."""

    def __init__(self, method_name: str, model_name: str, dataset: SegDataset, images: torch.Tensor,
                 labels: torch.Tensor, device: torch.device, amp: torch.dtype | None, counts: Callable[[], torch.Tensor],
                 options: dict[str, Any] | None = None):
        self.device, self.amp = device, amp
        # a teacher of the student's own architecture, random like the student: cost, not accuracy
        unit, teacher = random_init_unit(model_name, method_name, dataset.num_classes, options,
                                         teacher_model=model_name, class_pixel_counts=counts)
        self.teacher = teacher.to(device) if teacher is not None else None
        self.model, self.method = unit.model, unit.method
        self.unit = unit.to(device).train()
        params = [p for p in self.unit.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        self.images, self.labels = images.to(device), labels.to(device)
        self.iteration = 0

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext():
            teacher_out = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_out = self.teacher(self.images)
            terms = self.unit(self.images, self.labels, StepInfo(self.iteration, 1000), teacher_out)
        loss = sum(terms.values())
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1

    def live_bytes(self) -> int:
        tensors = list(self.unit.parameters()) + list(self.unit.buffers()) + [self.images, self.labels]
        tensors += [p.grad for p in self.unit.parameters()]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        if self.teacher is not None:
            tensors += list(self.teacher.parameters()) + list(self.teacher.buffers())
        return _tensor_bytes(tensors)

    def time_steps(self, warmup: int, iters: int) -> list[float]:
        for _ in range(warmup):
            self.step()
        _sync(self.device)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.step()
            _sync(self.device)
            times.append(time.perf_counter() - t0)
        return times

    def peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        # the profiler cannot size frees of blocks allocated before it started: drop the gradients
        # first (the step's own zero_grad would free them), so every free it sees has a known size
        self.optimizer.zero_grad(set_to_none=True)
        return cpu_peak_bytes(self.step, self.live_bytes())

    def flops(self) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            self.step()
        return counter.get_total_flops()


def fixed_batch(dataset: SegDataset, batch: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    view = TrainView(dataset, [crop, crop], [0.5, 2.0], True)
    loader = DataLoader(view, batch_size=batch, sampler=IterationSampler(len(view), batch, 1, seed=0))
    return next(iter(loader))


def bench_eval(model_name: str, dataset: SegDataset, n_images: int, device: torch.device,
               amp: torch.dtype | None) -> dict[str, Any]:
    """Whole-image inference, with the metric's share timed separately inside the same loop."""
    torch.manual_seed(0)
    model = build_model(model_name, dataset.num_classes).to(device).eval()
    view = EvalView(dataset, n_images)
    batches = [(im[None].to(device), lb[None].to(device)) for im, lb in (view[i] for i in range(len(view)))]
    mat = ConfusionMatrix(dataset.num_classes, device)
    t_model = t_metric = 0.0
    with torch.no_grad():
        for images, labels in batches[:2]:  # warm-up
            model(images)
        for images, labels in batches:
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                logits = model(images)["logits"]
            _sync(device)
            t1 = time.perf_counter()
            mat.update(predict(logits), labels)
            _sync(device)
            t_metric += time.perf_counter() - t1
            t_model += t1 - t0
    n = len(batches)
    return {"images": n, "images_per_s": round(n / t_model, 3),
            "images_per_s_with_metric": round(n / (t_model + t_metric), 3),
            "metric_overhead": round(t_metric / t_model, 5)}


def bench_loader(dataset: SegDataset, batch: int, crop: int, workers: int, n_batches: int,
                 device: torch.device) -> dict[str, Any]:
    """Images/s of the training stream as the Trainer builds it (first batch, with worker start-up, excluded)."""
    view = TrainView(dataset, [crop, crop], [0.5, 2.0], True)
    sampler = IterationSampler(len(view), batch, n_batches + 1, seed=0)
    loader = DataLoader(view, batch_size=batch, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers > 0 else None)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    count = sum(images.shape[0] for images, _ in it)
    dt = time.perf_counter() - t0
    return {"workers": workers, "images_per_s": round(count / dt, 3)}


def estimate_tables(step_s: dict[str, float], batch: int, crop: int, model: str) -> list[dict[str, Any]]:
    """Wall time of each table's `paper` preset (one seed) from the measured step times."""
    from sdesbench.experiments import expand, list_tables, load_spec

    out = []
    fallback = step_s["student"]
    for table in list_tables():
        try:
            spec = load_spec(table)
            if "paper" not in spec.get("presets", {}):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                plans = expand(spec, "paper", [0], Path(tmp))
        except Exception as e:  # a table naming a dataset or model not in this checkout
            out.append({"table": table, "note": f"not estimated ({type(e).__name__}: {e})"})
            continue
        runs = {str(p.out): p for p in plans if p.cfg is not None}
        seconds, iters, unmeasured = 0.0, 0, set()
        for p in runs.values():
            c = p.cfg
            scale = (c.data.batch_size * c.data.crop[0] * c.data.crop[1]) / (batch * crop * crop)
            if c.method.name not in step_s:
                unmeasured.add(c.method.name)
            seconds += c.train.iters * step_s.get(c.method.name, fallback) * scale
            iters += c.train.iters
        skipped = sum(1 for p in plans if p.cfg is None)
        if not runs:
            out.append({"table": table, "note": f"not estimated: none of its {skipped} rows can run in this checkout"})
            continue
        out.append({"table": table, "runs": len(runs), "iterations": iters, "hours": round(seconds / 3600, 2),
                    "rows_not_runnable": skipped,
                    "note": f"every model costed as {model}" + (f"; {', '.join(sorted(unmeasured))} costed as student"
                                                                 if unmeasured else "")})
    return out


def run_bench(s: BenchSettings, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    device = pick_device(s.device)
    amp = amp_dtype(s.amp, device)
    cuda = device.type == "cuda"
    batch = s.batch or (8 if cuda else 4)
    crop = s.crop or (512 if cuda else 128)
    if cuda:
        torch.backends.cudnn.benchmark = True
    build_config({}, [f"model.name={s.model}", f"data.name={s.dataset}"])  # name checks, one-line errors
    ds_cls = DATASETS.get(s.dataset)
    train_set = ds_cls(s.data_root, "train")
    eval_set = ds_cls(s.data_root, "val" if "val" in ds_cls.splits else ds_cls.splits[-1])
    names = s.methods or METHODS.names()
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS.names())}")
    names = ["student"] + [m for m in names if m != "student"]
    counts_cache: dict[str, torch.Tensor] = {}

    def counts() -> torch.Tensor:
        if "c" not in counts_cache:
            counts_cache["c"] = class_pixel_counts(train_set)
        return counts_cache["c"]

    images, labels = fixed_batch(train_set, batch, crop)
    peak = peak_flops(device, amp, s.peak_tflops)
    rows: list[dict[str, Any]] = []
    for name in names:
        log(f"bench {name}")
        try:
            sb = StepBench(name, s.model, train_set, images, labels, device, amp, counts, s.options.get(name))
            times = sb.time_steps(s.warmup, s.iters)
            mem = sb.peak_memory_bytes()
            flops = sb.flops()
        except Exception as e:  # a method that cannot be built or run here: reported, not fatal
            rows.append({"method": name, "note": f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            continue
        step = statistics.median(times)
        row = {"method": name, "step_ms": round(1e3 * step, 2),
               "step_ms_min": round(1e3 * min(times), 2), "peak_memory_mb": round(mem / 2**20, 1),
               "images_per_s": round(batch / step, 3), "gflops_per_step": round(flops / 1e9, 2),
               "tflops_per_s": round(flops / step / 1e12, 4)}
        if peak:
            row["peak_flops_fraction"] = round(flops / step / peak, 4)
        if s.options.get(name):
            row["options"] = s.options[name]
        rows.append(row)
        del sb
        if cuda:
            torch.cuda.empty_cache()
    ref = next((r for r in rows if r["method"] == "student" and "step_ms" in r), None)
    if ref is None:
        raise ConfigError(f"the student could not be benchmarked: {rows[0].get('note')}")
    for r in rows:
        if "step_ms" in r:
            r["time_ratio"] = round(r["step_ms"] / ref["step_ms"], 3)
            r["memory_ratio"] = round(r["peak_memory_mb"] / ref["peak_memory_mb"], 3)
    log("bench evaluation")
    evaluation = bench_eval(s.model, eval_set, s.eval_images, device, amp)
    log("bench data loader")
    loader = bench_loader(train_set, batch, crop, s.workers, s.loader_batches, device)
    loader["ratio_to_training_step"] = round(loader["images_per_s"] / ref["images_per_s"], 2)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores, "
                                                                   f"{torch.get_num_threads()} threads)",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count()},
        "settings": {"model": s.model, "dataset": s.dataset, "batch": batch, "crop": crop, "iters": s.iters,
                     "warmup": s.warmup, "amp": str(amp).replace("torch.", "") if amp else "off",
                     "memory_method": "torch.cuda.max_memory_allocated" if cuda else
                     "torch.profiler allocation events + tensors alive before the step"},
        "peak_tflops": round(peak / 1e12, 1) if peak else None,
        "methods": rows,
        "eval": evaluation,
        "data_loader": loader,
    }
    if s.tables:
        step_s = {r["method"]: r["step_ms"] / 1e3 for r in rows if "step_ms" in r}
        result["tables"] = estimate_tables(step_s, batch, crop, s.model)
    return result


def format_report(r: dict[str, Any]) -> str:
    """Markdown tables (for the terminal and for docs/performance.md)."""
    st = r["settings"]
    lines = [f"device: {r['device']}; model {st['model']}, batch {st['batch']}, crop {st['crop']}, "
             f"amp {st['amp']}, median of {st['iters']} steps after {st['warmup']}", "",
             "| method | step ms | x student | peak MB | x student | img/s | GFLOP/step | TFLOP/s |"
             + (" % of peak |" if r.get("peak_tflops") else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if r.get("peak_tflops") else "")]
    for m in r["methods"]:
        if "step_ms" not in m:
            lines.append(f"| {m['method']} | {m['note']} |")
            continue
        row = (f"| {m['method']} | {m['step_ms']:.1f} | {m['time_ratio']:.3f} | {m['peak_memory_mb']:.1f} | "
               f"{m['memory_ratio']:.3f} | {m['images_per_s']:.2f} | {m['gflops_per_step']:.1f} | "
               f"{m['tflops_per_s']:.3f} |")
        if r.get("peak_tflops"):
            row += f" {100 * m.get('peak_flops_fraction', math.nan):.1f} |"
        lines.append(row)
    e, d = r["eval"], r["data_loader"]
    lines += ["", f"evaluation: {e['images_per_s']:.2f} img/s without the metric, {e['images_per_s_with_metric']:.2f} "
                  f"with it; metric accumulation adds {100 * e['metric_overhead']:.2f}% ({e['images']} images)",
              f"data loader ({d['workers']} workers): {d['images_per_s']:.1f} img/s = "
              f"{d['ratio_to_training_step']:.1f}x what the student's training step consumes"]
    for t in r.get("tables", []):
        if "hours" in t:
            lines.append(f"table {t['table']} (paper preset, 1 seed): {t['runs']} runs, {t['iterations']} iterations, "
                         f"~{t['hours']:.1f} h on this device ({t['note']})")
        else:
            lines.append(f"table {t['table']}: {t['note']}")
    return "\n".join(lines)
