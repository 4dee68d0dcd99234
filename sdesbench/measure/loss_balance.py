"""Loss balance: each loss term's value and the size of its gradient at the student's encoder.

A weighted loss term's value says little about how hard it pulls on the network: what SGD feels
is its gradient. `loss_balance` returns, for every term a method computes on one batch, its value
and the L2 norm of its gradient with respect to the encoder's parameters (one `autograd.grad` per
term on a shared graph), each also relative to the task loss `ss` (L_SS, Eq. 1). The encoder is
where every distillation term of the suite meets the task loss (the decoder sees only some
terms), so that is where their relative sizes decide the training. `checkpoint_balance` rebuilds
a run from a checkpoint written by `sdesbench train` and averages the measurement over fixed
training batches (`sdesbench balance`; docs/sdes.md uses it to choose SDES's default forms).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from sdesbench.data.base import IterationSampler, TrainView, build_dataset, class_pixel_counts
from sdesbench.engine.configure import build_config
from sdesbench.engine.runtime import Runtime
from sdesbench.engine.step import build_learner, load_teacher
from sdesbench.errors import CheckpointError, SdesbenchError
from sdesbench.io import load_checkpoint
from sdesbench.methods.base import Method, StepInfo
from sdesbench.models.base import SegmentationModel

REFERENCE = "ss"  # the term every ratio is taken against
FIELDS = ("value", "grad_norm", "value_ratio", "grad_ratio")


def encoder_parameters(model: SegmentationModel) -> list[nn.Parameter]:
    """The student's trainable encoder parameters: all but those of `decoder` and `aux_head`."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and not name.startswith(("decoder.", "aux_head."))]


def gradient(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """d loss / d params (zeros where the loss does not reach a parameter); the graph is kept."""
    if not loss.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def norm(grads: Sequence[torch.Tensor]) -> float:
    """L2 norm of a gradient given as one tensor per parameter."""
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def _ratio(x: float, ref: float) -> float | None:
    return x / ref if ref != 0 else None


def loss_balance(model: SegmentationModel, method: Method, images: torch.Tensor, labels: torch.Tensor,
                 teacher_out: dict[str, Any] | None = None, step: StepInfo | None = None,
                 params: Sequence[nn.Parameter] | None = None) -> dict[str, dict[str, float | None]]:
    """{term: {value, grad_norm, value_ratio, grad_ratio}} for one batch, plus a `total` row.

    The terms are the method's already weighted `loss_terms` (what the Trainer sums); `total` is
    their sum. `grad_norm` is the L2 norm of the term's gradient with respect to `params`
    (default: `encoder_parameters(model)`); the ratios divide by the `ss` row's value and gradient
    norm (None where that is 0). Modules run in the mode they are in (train mode measures what a
    training step sees, and updates BatchNorm's running statistics as a step does); no parameter
    and no `.grad` is changed.
    """
    params = encoder_parameters(model) if params is None else list(params)
    out = model(images)
    terms = method.loss_terms(out, labels, step or StepInfo(0, 1), teacher_out)
    if REFERENCE not in terms:
        raise SdesbenchError(f"method {method.name!r} returned no {REFERENCE!r} term to compare with")
    grads = {name: gradient(t, params) for name, t in terms.items()}
    grads["total"] = [sum(gs) for gs in zip(*grads.values())]  # the gradient is linear: no extra backward
    values = {name: float(t.detach()) for name, t in terms.items()}
    values["total"] = sum(values.values())
    rows = {name: {"value": values[name], "grad_norm": norm(grads[name])} for name in values}
    ref = rows[REFERENCE]
    for row in rows.values():
        row["value_ratio"] = _ratio(row["value"], ref["value"])
        row["grad_ratio"] = _ratio(row["grad_norm"], ref["grad_norm"])
    return rows


def mean_balance(per_batch: list[dict[str, dict[str, float | None]]]) -> dict[str, dict[str, float | None]]:
    """Mean over batches of every field (a ratio is the mean of the per-batch ratios)."""
    out: dict[str, dict[str, float | None]] = {}
    for name in per_batch[0]:
        out[name] = {}
        for f in FIELDS:
            vals = [b[name][f] for b in per_batch if b[name][f] is not None]
            out[name][f] = sum(vals) / len(vals) if vals else None
    return out


def checkpoint_balance(checkpoint: str | Path, batches: int = 4, overrides: Sequence[str] = (),
                       data_root: str | Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Loss balance of the run that wrote `checkpoint`, averaged over its first `batches` training batches.

    The dataset, student, method (expert decoders and all) and teacher are rebuilt from the
    checkpoint's configuration with `overrides` (`--set` strings, e.g. `method.dfed_distance=l2`)
    applied, as the Trainer builds them (`engine.step.build_learner`), so two forms of a loss are
    measured on the same weights. The batches are the run's own first `batches` iterations (same
    seed, crop, scale and flip); each forward pass reseeds torch's RNG with the batch index so
    dropout is the same under every override.
    """
    state = load_checkpoint(checkpoint)
    cfg = build_config(state["config"], list(overrides))
    if data_root is not None:
        cfg.data.root = str(data_root)
    cfg.model.pretrained = False  # the checkpoint's weights replace any ImageNet initialisation
    runtime = Runtime.create(device)
    num_classes = int(state["num_classes"])
    train_set = build_dataset(cfg.data.name, cfg.data.root, cfg.data.train_split)
    # the class pixel counts SDES splits by: where the Trainer cached them ($SDESBENCH_CACHE or <run>/cache)
    cache = Path(os.environ.get("SDESBENCH_CACHE") or Path(checkpoint).resolve().parent.parent / "cache")
    learner = build_learner(cfg.model, cfg.method.name, cfg.method.options, num_classes, runtime, cfg.train,
                            lambda: class_pixel_counts(train_set, cache if cache.is_dir() else None),
                            lambda: load_teacher(cfg.teacher.model, cfg.teacher.checkpoint, cfg.method.name,
                                                 num_classes, runtime.device))
    model, method = learner.model, learner.method
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise CheckpointError(f"{checkpoint} does not fit model {cfg.model.name}") from None
    try:
        method.load_state_dict(state["method"])
    except RuntimeError:
        raise CheckpointError(f"{checkpoint}: the method's modules do not fit the options given "
                              "(an override changed their shape)") from None
    learner.unit.train()

    view = TrainView(train_set, cfg.data.crop, cfg.data.scale, cfg.data.flip)
    sampler = IterationSampler(len(view), cfg.data.batch_size, batches, cfg.train.seed)
    loader = DataLoader(view, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=0)
    step = StepInfo(int(state["iteration"]), cfg.train.iters)
    per_batch = []
    for i, (images, labels) in enumerate(loader):
        images, labels = runtime.to_device(images, labels)
        torch.manual_seed(i)
        teacher_out = None
        if learner.teacher is not None:
            with torch.no_grad():
                teacher_out = learner.teacher(images)
        per_batch.append(loss_balance(model, method, images, labels, teacher_out, step))
    return {"checkpoint": str(checkpoint), "iteration": int(state["iteration"]), "method": cfg.method.name,
            "model": cfg.model.name, "overrides": list(overrides),
            "method_options": dataclasses.asdict(method.opts), "batches": len(per_batch),
            "batch_size": cfg.data.batch_size, "crop": list(cfg.data.crop), "scale": list(cfg.data.scale),
            "terms": mean_balance(per_batch)}
