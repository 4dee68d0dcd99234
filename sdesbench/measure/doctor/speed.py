"""The speed report of `sdesbench doctor`: the student's training step at each `paper` protocol (batch,
crop) per model and precision (images/s, peak memory, FLOP/s and the fraction of the device's peak),
and from it each table's wall time (one seed) with every local GPU training a run. On a CPU the step
is measured smaller and scaled by pixels."""
from __future__ import annotations

from typing import Any, Callable

import torch

from sdesbench.data.tiny import TinyScenes
from sdesbench.engine import step
from sdesbench.engine.runtime import Runtime
from sdesbench.experiments.spec import list_tables, load_spec
from sdesbench.measure.bench import estimate_tables, fixed_batch, peak_flops
from sdesbench.measure.doctor.precision import REFERENCE_MODEL, Precision
from sdesbench.measure.step_cost import StepBench


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
