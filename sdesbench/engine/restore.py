"""A trained network brought back from its checkpoint: the one place that does it.

The teacher of a distillation run (`step.load_teacher`), `sdesbench eval`, `sdesbench show` and
`report --qualitative` (`predict.load_run`) all restore through `restore`.

A checkpoint holds every weight, so the network is built from the checkpoint's own configuration with
`pretrained` off and no `weights` file: ImageNet weights would be overwritten at once, and a compute
node without network could not fetch them (a `paper` run trains with `pretrained: true`). Nothing of
the training set-up runs: no disk-space check, no dataset scan, no teacher checkpoint.

With `with_method`, the method's own modules come back too (SDES's experts, for Ens-T). A method is
built from the run's options as the Trainer built it. The one thing it may need from the training set,
the per-class pixel counts (SDES's "more to less" class split), is stored in checkpoints since this
module exists (`CLASS_COUNTS_KEY`); for an older checkpoint they are counted from the training split,
which must then be readable. A teacher-student method gets a randomly initialised copy of its teacher's
architecture to size its adapters: its weights are not used to predict.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sdesbench.config import RunConfig
from sdesbench.data.base import build_dataset, class_pixel_counts
from sdesbench.engine.configure import build_config
from sdesbench.errors import CheckpointError
from sdesbench.io import load_checkpoint
from sdesbench.methods import METHODS
from sdesbench.methods.base import Method, MethodContext
from sdesbench.models import SegmentationModel, build_model

CLASS_COUNTS_KEY = "class_pixel_counts"  # the training split's per-class pixel counts, when the method used them


@dataclass
class Restored:
    """A checkpoint's network (and method modules), in eval mode, on the device it was asked for."""

    path: Path
    cfg: RunConfig  # the run's configuration (as trained, pretrained included)
    model: SegmentationModel
    method: Method | None
    num_classes: int
    iteration: int


def checkpoint_config(state: dict[str, Any], path: Path, overrides: list[str] | None = None) -> RunConfig:
    """The run configuration a checkpoint was trained with. A bare weights file (`model`, `num_classes`,
    `model_name`: a network trained elsewhere, e.g. a teacher) counts as a default run of that network."""
    if not isinstance(state, dict) or not all(k in state for k in ("model", "num_classes")) \
            or not ("config" in state or "model_name" in state):
        raise CheckpointError(f"{path} is not a checkpoint written by `sdesbench train` (nor a bare weights "
                              "file with model, num_classes and model_name)")
    config = state.get("config") or {"model": {"name": state["model_name"]}}
    return build_config(dict(config), overrides)


def stored_class_counts(state: dict[str, Any], cfg: RunConfig, cache_dir: Path | None = None) -> torch.Tensor:
    """The class pixel counts the run was built with: from the checkpoint, else counted again."""
    counts = state.get(CLASS_COUNTS_KEY)
    if isinstance(counts, torch.Tensor):
        return counts
    return class_pixel_counts(build_dataset(cfg.data.name, cfg.data.root, cfg.data.train_split), cache_dir)


def restore(path: str | Path, device: torch.device | str = "cpu", with_method: bool = False,
            state: dict[str, Any] | None = None) -> Restored:
    """The network of checkpoint `path` with its weights, never ImageNet's (module docstring); one-line
    errors for a file that is not a checkpoint or does not fit the network its configuration names."""
    path = Path(path)
    state = load_checkpoint(path) if state is None else state
    cfg = checkpoint_config(state, path)
    num_classes = int(state["num_classes"])
    model = build_model(replace(cfg.model, pretrained=False, weights=None), num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise CheckpointError(f"{path} does not fit the {cfg.model.name} its configuration names") from None
    method = None
    if with_method:
        method_cls = METHODS.get(cfg.method.name)
        teacher = build_model(cfg.teacher.model, num_classes) if method_cls.needs_teacher and cfg.teacher.model \
            else None
        ctx = MethodContext(model=model, num_classes=num_classes, total_iters=cfg.train.iters,
                            class_pixel_counts=lambda: stored_class_counts(state, cfg), teacher=teacher,
                            seed=cfg.train.seed, read_artefacts=False)  # its state is the checkpoint's
        method = method_cls(method_cls.parse_options(cfg.method.options, num_classes), ctx)
        try:
            method.load_state_dict(state["method"])
        except RuntimeError:
            raise CheckpointError(f"{path}: the {cfg.method.name} modules do not fit its configuration") from None
        method.to(device).eval()
    model.to(device).eval()
    return Restored(path, cfg, model, method, num_classes, int(state.get("iteration", 0)))
