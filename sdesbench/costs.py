"""Model size and training cost for the reports: Params, FLOPs and training FLOPs relative to the student.

- Params/FLOPs of a network at the paper's input size come from the profiler,
  `sdesbench.profile.profile_model(name, num_classes, input_hw) -> {"params_m", "gflops"}`, when that
  module exists; otherwise Params are counted here (`count_params`) and FLOPs are reported as missing.
- Training FLOPs of one step (forward and backward of the student and of the method's own modules
  such as SDES experts, plus the frozen teacher's forward) are counted with torch's
  `FlopCounterMode` at a small input (64x64, batch 2) and divided by the same count for the plain
  student. The ratio is what the report shows ("train FLOPs ×"); it depends little on the input
  size for these fully convolutional networks, and no weights are needed (random init).

Results are cached in `results/cache/costs.json` (keyed by what determines them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sdesbench.config import RunConfig, build_config
from sdesbench.engine.io import write_json

FLOP_INPUT_HW = (64, 64)


class CostCache:
    def __init__(self, results: Path):
        self.path = results / "cache" / "costs.json"
        try:
            self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            self.data = {}
        self.dirty = False

    def get(self, key: str, compute):
        if key not in self.data:
            self.data[key] = compute()
            self.dirty = True
        return self.data[key]

    def save(self) -> None:
        if self.dirty:
            write_json(self.path, self.data)
            self.dirty = False


def _profiler():
    try:
        from sdesbench.profile import profile_model  # written by the profiling work; optional here
    except ImportError:
        return None
    return profile_model


def model_profile(name: str, num_classes: int, input_hw: list[int] | tuple[int, int]) -> dict[str, Any]:
    """{"params_m", "gflops" (None without the profiler), "source"} of a registered model."""
    from sdesbench.models import build_model, count_params

    prof = _profiler()
    if prof is not None:
        r = prof(name, num_classes, tuple(input_hw))
        return {"params_m": float(r["params_m"]), "gflops": r.get("gflops"), "source": "sdesbench.profile"}
    model = build_model(name, num_classes)
    return {"params_m": count_params(model) / 1e6, "gflops": None, "source": "count_params"}


def _build_unit(cfg: RunConfig):
    from sdesbench.engine.trainer import random_init_unit
    from sdesbench.registry import DATASETS

    num_classes = DATASETS.get(cfg.data.name).num_classes
    unit, teacher = random_init_unit(cfg.model.name, cfg.method.name, num_classes, cfg.method.options,
                                     cfg.teacher.model, cfg.train.iters, seed=cfg.train.seed)
    return unit, teacher, num_classes


def method_params_m(cfg: RunConfig) -> float:
    """Parameters of the student plus the method's own modules (e.g. SDES's ensemble teacher), in M."""
    from sdesbench.models import count_params

    unit, _, _ = _build_unit(cfg)
    return (count_params(unit.model) + count_params(unit.method)) / 1e6


def train_step_flops(cfg: RunConfig, hw: tuple[int, int] = FLOP_INPUT_HW) -> float:
    """FLOPs of one training step (batch 2): teacher forward + student/method forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdesbench.methods.base import StepInfo

    unit, teacher, num_classes = _build_unit(cfg)
    unit.train()
    images = torch.randn(2, 3, *hw)  # batch 2: BatchNorm after global pooling needs two samples
    labels = torch.randint(0, num_classes, (2, *hw))
    with FlopCounterMode(display=False) as counter:
        teacher_out = None
        if teacher is not None:
            with torch.no_grad():
                teacher_out = teacher(images)
        terms = unit(images, labels, StepInfo(0, cfg.train.iters), teacher_out)
        sum(terms.values()).backward()
    return float(counter.get_total_flops())


def train_flops_ratio(cfg: RunConfig, cache: CostCache) -> float:
    """Training FLOPs of `cfg`'s method relative to the plain student on the same network."""
    if cfg.method.name == "student":
        return 1.0
    student = build_config({"model": {"name": cfg.model.name}, "data": {"name": cfg.data.name}})

    def key(c: RunConfig) -> str:
        return "train_flops:" + json.dumps([c.model.name, c.data.name, c.method.name, c.method.options,
                                            c.teacher.model], sort_keys=True, default=str)

    num = cache.get(key(cfg), lambda: train_step_flops(cfg))
    den = cache.get(key(student), lambda: train_step_flops(student))
    return num / den
