"""Segmentation models. Each module registers its factories with `@MODELS.register(name)`;
importing this package imports them all.

A factory takes `(num_classes, pretrained=False, weights=None, aux=False)` and returns a
`SegmentationModel` (see `base.py` for the output-dict contract).
"""
from __future__ import annotations

from sdesbench.config import ModelConfig
from sdesbench.models.base import MODELS, SegmentationModel, count_params
from sdesbench.registry import import_submodules

__all__ = ["MODELS", "build_model", "SegmentationModel", "count_params"]


def build_model(cfg: ModelConfig | str, num_classes: int) -> SegmentationModel:
    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg)
    factory = MODELS.get(cfg.name)
    return factory(num_classes, pretrained=cfg.pretrained, weights=cfg.weights, aux=cfg.aux)


import_submodules(__name__, __path__)
