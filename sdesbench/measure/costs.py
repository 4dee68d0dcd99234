"""Model size and training cost for the reports: Params/FLOPs and training FLOPs relative to the student.

- Params/FLOPs of a network at the paper's input size: `measure.profile.model_profile` (fvcore), the
  numbers `sdesbench profile` prints.
- Training FLOPs of one step (forward and backward of the student and of the method's own modules
  such as SDES experts, plus the frozen teacher's forward) are counted with torch's
  `FlopCounterMode` over `engine.step.train_step` at a small input (64x64, batch 2: BatchNorm after
  global pooling needs two samples) and divided by the same count for the plain student. The ratio
  is what the report shows ("train FLOPs ×"); it depends little on the input size for these fully
  convolutional networks, and no weights are needed (random init).

Results are cached in `results/cache/costs.json` (keyed by what determines them).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch

from sdesbench.config import RunConfig
from sdesbench.data import DATASETS
from sdesbench.engine.configure import build_config
from sdesbench.engine.step import random_learner
from sdesbench.errors import StorageError
from sdesbench.io import read_json, write_json
from sdesbench.measure.profile import EnsembleTeacher, count_gflops, model_profile
from sdesbench.measure.step_cost import StepBench
from sdesbench.models import count_params

FLOP_INPUT_HW = (64, 64)


class CostCache:
    def __init__(self, results: Path):
        self.path = Path(results) / "cache" / "costs.json"
        try:
            data = read_json(self.path) if self.path.is_file() else {}
        except StorageError:
            data = {}  # an unreadable cache is a miss: recomputed and rewritten
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}
        self.dirty = False

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.data:
            self.data[key] = compute()
            self.dirty = True
        return self.data[key]

    def save(self) -> None:
        if self.dirty:
            write_json(self.path, self.data)
            self.dirty = False


def cached_profile(cache: CostCache, model: str, num_classes: int, input_hw: list[int]) -> dict[str, Any]:
    return cache.get(f"profile:{model}:{num_classes}:{list(input_hw)}",
                     lambda: model_profile(model, num_classes, tuple(input_hw)))


def train_step_flops(cfg: RunConfig, hw: tuple[int, int] = FLOP_INPUT_HW) -> float:
    """FLOPs of one training step (batch 2): teacher forward + student/method forward and backward."""
    num_classes = DATASETS.get(cfg.data.name).num_classes
    train = dataclasses.replace(cfg.train, compile=False, sync_bn=False)
    learner = random_learner(cfg.model.name, cfg.method.name, num_classes, cfg.method.options, train=train,
                             teacher_model=cfg.teacher.model)
    images = torch.randn(2, 3, *hw)
    labels = torch.randint(0, num_classes, (2, *hw))
    return float(StepBench(learner, images, labels, cfg.train.iters).flops())


def ensemble_profile(cfg: RunConfig, num_classes: int, input_hw: list[int]) -> dict[str, Any] | None:
    """Params (M) and GFLOPs of a method's ensemble teacher (the student plus the method's expert
    decoders, SDES's Ens-T) at `num_classes` / `input_hw`, as `sdesbench profile` counts a network;
    None for a method without experts."""
    learner = random_learner(cfg.model.name, cfg.method.name, num_classes, cfg.method.options,
                             teacher_model=cfg.teacher.model)
    experts = getattr(learner.method, "experts", None)
    if not experts:
        return None
    net = EnsembleTeacher(learner.model, experts).eval()
    return {"params_m": round(count_params(net) / 1e6, 4), "gflops": round(count_gflops(net, tuple(input_hw)), 4)}


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
