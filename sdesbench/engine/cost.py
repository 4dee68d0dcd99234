"""What a run's training costs, counted once: FLOPs of one training step, the ratio to the plain student,
and a finished run's total cost (device-hours, images trained on).

- FLOPs of one step (forward and backward of the student and of the method's own modules such as SDES
  experts, plus the frozen teacher's forward) are counted with torch's `FlopCounterMode` around
  `engine.step.train_step` on a random learner built as the Trainer builds one, at a small input (64x64,
  batch 2: BatchNorm after global pooling needs two samples). Divided by the same count for the plain
  student they give the report's `train FLOPs ×` and what `run --compute-matched` trains a Student for:
  the ratio depends little on the input size for these fully convolutional networks, and no weights are
  needed. Counts are cached in `<results>/cache/costs.json`, keyed by what determines them.
- A run's total cost (`engine.record.RunCost`, in its record): device-hours (wall time x devices: GPU-hours on CUDA,
  CPU-hours otherwise) and the images it trained on (iterations x batch x processes). Its training
  FLOPs are `images` x the counted FLOPs per image (`train_flops`), scaled from the 64x64 count to the
  run's crop by pixel count, the same approximation the ratio makes.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdesbench.config import RunConfig
from sdesbench.data import DATASETS
from sdesbench.engine import step
from sdesbench.errors import StorageError
from sdesbench.io import read_json, write_json
from sdesbench.methods.base import StepInfo

FLOP_INPUT_HW = (64, 64)
FLOP_BATCH = 2


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs torch counts while `fn` runs."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def train_step_flops(cfg: RunConfig, hw: tuple[int, int] = FLOP_INPUT_HW) -> float:
    """FLOPs of one training step (batch 2): teacher forward + student/method forward and backward."""
    num_classes = DATASETS.get(cfg.data.name).num_classes
    train = dataclasses.replace(cfg.train, compile=False, sync_bn=False)
    learner = step.random_learner(cfg.model.name, cfg.method.name, num_classes, cfg.method.options, train=train,
                                  teacher_model=cfg.teacher.model)
    images = torch.randn(FLOP_BATCH, 3, *hw)
    labels = torch.randint(0, num_classes, (FLOP_BATCH, *hw))
    learner.unit.train()
    return float(count_flops(lambda: step.train_step(learner, images, labels, StepInfo(0, cfg.train.iters))))


class CostCache:
    """`<results>/cache/costs.json`: counted FLOPs (and the reports' model profiles), keyed by what
    determines them; an unreadable file is a miss, recomputed and rewritten."""

    def __init__(self, results: Path):
        self.path = Path(results) / "cache" / "costs.json"
        try:
            data = read_json(self.path) if self.path.is_file() else {}
        except StorageError:
            data = {}
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


def plain_student(cfg: RunConfig) -> RunConfig:
    """The reference of the ratio: the plain student of `cfg`'s network and dataset, default settings."""
    from sdesbench.engine.configure import build_config
    return build_config({"model": {"name": cfg.model.name}, "data": {"name": cfg.data.name}})


def cached_step_flops(cfg: RunConfig, cache: CostCache) -> float:
    key = "train_flops:" + json.dumps([cfg.model.name, cfg.data.name, cfg.method.name, cfg.method.options,
                                       cfg.teacher.model], sort_keys=True, default=str)
    return cache.get(key, lambda: train_step_flops(cfg))


def train_flops_ratio(cfg: RunConfig, cache: CostCache) -> float:
    """Training FLOPs of one step of `cfg`'s method relative to the plain student on the same network."""
    if cfg.method.name == "student":
        return 1.0
    return cached_step_flops(cfg, cache) / cached_step_flops(plain_student(cfg), cache)


def flops_per_image(cfg: RunConfig, cache: CostCache) -> float:
    """Training FLOPs per image at the run's crop: the 64x64 count per image scaled by pixel count."""
    crop_h, crop_w = cfg.data.crop if isinstance(cfg.data.crop, (list, tuple)) else (cfg.data.crop, cfg.data.crop)
    scale = crop_h * crop_w / (FLOP_INPUT_HW[0] * FLOP_INPUT_HW[1])
    return cached_step_flops(cfg, cache) / FLOP_BATCH * scale
