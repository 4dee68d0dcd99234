"""Model size and training cost for the reports: Params/FLOPs and training FLOPs relative to the student.

- Params/FLOPs of a network at the paper's input size: `measure.profile.model_profile` (fvcore), the
  numbers `sdesbench profile` prints.
- Training FLOPs of one step relative to the plain student ("train FLOPs ×"): counted once, in
  `engine/cost.py` (also what `run --compute-matched` trains a Student for).

Results are cached in `results/cache/costs.json` (keyed by what determines them).
"""
from __future__ import annotations

from typing import Any

from sdesbench.config import RunConfig
from sdesbench.engine.cost import CostCache
from sdesbench.engine.step import random_learner
from sdesbench.measure.profile import EnsembleTeacher, count_gflops, model_profile
from sdesbench.models import count_params


def cached_profile(cache: CostCache, model: str, num_classes: int, input_hw: list[int]) -> dict[str, Any]:
    return cache.get(f"profile:{model}:{num_classes}:{list(input_hw)}",
                     lambda: model_profile(model, num_classes, tuple(input_hw)))


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
