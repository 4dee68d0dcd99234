"""The training step, written once: building what it needs (`build_learner`) and running it (`train_step`).

A `Learner` bundles the train unit (student + method modules, DDP-wrapped under torchrun), the
frozen teacher (if the method needs one), the optimizer, the gradient scaler and the runtime
(device, autocast, channels_last). `train_step` is the one place where a step happens: the
Trainer, `sdesbench bench`, the training-FLOPs count of the reports, `sdesbench doctor` and the
method x model test matrix all call it through this module (`step.train_step(...)`), so a change
to how a step runs (precision, memory layout, teacher forward) is made here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from sdesbench.config import ModelConfig, TrainConfig
from sdesbench.engine import distributed as D
from sdesbench.engine.restore import restore
from sdesbench.engine.runtime import Runtime
from sdesbench.io import load_checkpoint
from sdesbench.errors import CheckpointError, SdesbenchError
from sdesbench.methods import METHODS
from sdesbench.methods.base import Method, MethodContext, StepInfo
from sdesbench.models import SegmentationModel, build_model

LossGuard = Callable[[dict[str, torch.Tensor], torch.Tensor], None]


class TrainUnit(nn.Module):
    """Student + method in one module, so DDP synchronises the method's own modules (experts,
    adapters) with the student; forward returns the method's loss terms."""

    def __init__(self, model: SegmentationModel, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, images, labels, step: StepInfo, teacher_out=None, own: bool = False) -> dict[str, torch.Tensor]:
        """The method's loss terms for the student; with `own`, the loss of the method's own update (a
        discriminator's, on what `loss_terms` kept), run through this module so DDP averages its gradients."""
        if own:
            return self.method.own_loss_terms(step)
        return self.method.loss_terms(self.model(images), labels, step, teacher_out)

    def train(self, mode: bool = True) -> "TrainUnit":
        super().train(mode)
        if self.method.student_is_teacher:  # the frozen teacher keeps its running statistics
            self.model.eval()
        return self


@dataclass
class Learner:
    """Everything one training step needs."""

    unit: nn.Module  # TrainUnit, or DistributedDataParallel(TrainUnit) under torchrun
    teacher: SegmentationModel | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    runtime: Runtime
    # a method that updates some of its parameters itself (SKD's discriminator): their optimizer, and the
    # last step's terms of that update (logged beside the student's, never added to its loss)
    method_optimizer: torch.optim.Optimizer | None = None
    own_terms: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def plain_unit(self) -> TrainUnit:
        return self.unit.module if isinstance(self.unit, nn.parallel.DistributedDataParallel) else self.unit

    @property
    def model(self) -> SegmentationModel:
        return self.plain_unit.model

    @property
    def method(self) -> Method:
        return self.plain_unit.method


def train_step(learner: Learner, images: torch.Tensor, labels: torch.Tensor, info: StepInfo,
               guard: LossGuard | None = None) -> dict[str, torch.Tensor]:
    """One SGD step: teacher forward (no grad), student + method forward, loss terms, backward, update;
    then, for a method that updates parameters of its own (`Method.own_optimizer`), its own loss on what
    the first forward kept, backward and update of those parameters alone (`learner.own_terms`).

    `guard(terms, loss)` runs after each forward and before its backward; it may raise to stop before a
    non-finite loss touches the weights. Returns the student's (weighted) loss terms.
    """
    rt = learner.runtime
    images, labels = rt.to_device(images, labels)
    with rt.autocast():
        teacher_out = None
        if learner.teacher is not None:
            with torch.no_grad():
                teacher_out = learner.teacher(images)
        terms = learner.unit(images, labels, info, teacher_out)
    loss = sum(terms.values())
    if guard is not None:
        guard(terms, loss)
    learner.optimizer.zero_grad(set_to_none=True)
    learner.scaler.scale(loss).backward()
    clip_declared_grad_norms(learner.optimizer, learner.scaler)
    learner.scaler.step(learner.optimizer)
    if learner.method_optimizer is not None:
        with rt.autocast():
            own = learner.unit(None, None, info, own=True)
        own_loss = sum(own.values())
        if guard is not None:
            guard(own, own_loss)
        learner.method_optimizer.zero_grad(set_to_none=True)  # also drops what the student's loss gave them
        learner.scaler.scale(own_loss).backward()
        clip_declared_grad_norms(learner.method_optimizer, learner.scaler)
        learner.scaler.step(learner.method_optimizer)
        learner.own_terms = own
    learner.scaler.update()
    return terms


def clip_declared_grad_norms(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Clip the gradients of every parameter group that declares a `max_grad_norm` (`Method.param_groups`) to that
    L2 norm, group by group, as the reference codes clip their loss modules before stepping. Under fp16 the
    gradients are unscaled first (the scaler's step then does not unscale them again, and still skips a step
    whose gradients are not finite)."""
    clipped = [g for g in optimizer.param_groups if g.get("max_grad_norm")]
    if not clipped:
        return
    scaler.unscale_(optimizer)
    for group in clipped:
        torch.nn.utils.clip_grad_norm_(group["params"], group["max_grad_norm"])


# ----------------------------------------------------------------------------- building


def freeze(model: SegmentationModel) -> SegmentationModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(model_name: str | None, checkpoint: str | None, method_name: str, num_classes: int,
                 device: torch.device) -> SegmentationModel:
    """The teacher `model_name` with the weights of `checkpoint`; eval mode, frozen, on `device`."""
    if not checkpoint:
        raise SdesbenchError(f"method {method_name!r} needs teacher.checkpoint (train one with `sdesbench train`"
                             " or let `sdesbench run` do it)")
    if not model_name:
        raise SdesbenchError(f"method {method_name!r} needs teacher.model (the teacher's architecture, "
                             "e.g. deeplabv3_resnet50)")
    state = load_checkpoint(checkpoint)
    if state.get("model_name") != model_name:
        raise CheckpointError(f"teacher checkpoint {checkpoint} is a {state.get('model_name')}, "
                              f"not the {model_name} the spec names")
    if state.get("num_classes") != num_classes:
        raise CheckpointError(f"teacher checkpoint {checkpoint} has {state.get('num_classes')} classes, "
                              f"the dataset has {num_classes}")
    # built as it was trained (an aux head if it had one), never with ImageNet weights: its own replace them
    return freeze(restore(checkpoint, device, state=state).model)


def make_optimizer(unit: TrainUnit, train: TrainConfig, exclude: set[int] = frozenset()) -> torch.optim.Optimizer:
    """`train.optimizer` (SGD with momentum, or AdamW with torch's default betas) over every trainable parameter
    of the student and the method's modules, except those whose id is in `exclude` (the parameters a method
    updates itself): one group at `train.lr`, then the groups the method asks for (`Method.param_groups`),
    whose parameters leave the first."""
    groups = unit.method.param_groups(train.lr)
    grouped = {id(p) for g in groups for p in g["params"]}
    if grouped & exclude:
        raise SdesbenchError(f"method {unit.method.name!r}: a parameter is both in param_groups and updated by "
                             "its own optimizer")
    params = [p for p in unit.parameters() if p.requires_grad and id(p) not in exclude and id(p) not in grouped]
    if train.optimizer == "adamw":
        return torch.optim.AdamW([{"params": params}, *groups], lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD([{"params": params}, *groups], lr=train.lr, momentum=train.momentum,
                           weight_decay=train.weight_decay)


def build_learner(model_cfg: ModelConfig, method_name: str, options: dict[str, Any], num_classes: int,
                  runtime: Runtime, train: TrainConfig, class_pixel_counts: Callable[[], torch.Tensor],
                  make_teacher: Callable[[], SegmentationModel | None] = lambda: None,
                  read_artefacts: bool = True) -> Learner:
    """Student, teacher (from `make_teacher`, called between the student and the method so the
    random-number stream, hence every initial weight, is the same for every caller), method,
    optimizer and scaler, on the runtime's device; DDP-wrapped under torchrun. For a method whose run
    trains on the teacher itself (`student_is_teacher`) the teacher is the run's network, and there is no
    separate teacher. `read_artefacts`: whether the method may read the files its options name."""
    method_cls = METHODS.get(method_name)
    if method_cls.student_is_teacher:
        model, teacher = make_teacher(), None
    else:
        model = build_model(model_cfg, num_classes)
        teacher = make_teacher() if method_cls.needs_teacher else None
    opts = method_cls.parse_options(options, num_classes)
    ctx = MethodContext(model=model, num_classes=num_classes, total_iters=train.iters,
                        class_pixel_counts=class_pixel_counts, teacher=teacher, seed=train.seed,
                        rank=D.rank(), read_artefacts=read_artefacts)
    unit = TrainUnit(model, method_cls(opts, ctx)).to(runtime.device)
    if teacher is not None:
        teacher.to(runtime.device)
    if runtime.channels_last:
        unit.to(memory_format=torch.channels_last)
    own = unit.method.own_optimizer(train)  # built on the device, after channels_last
    owned = {id(p) for group in own.param_groups for p in group["params"]} if own is not None else set()
    optimizer = make_optimizer(unit, train, owned)
    if train.compile:
        model.forward = torch.compile(model.forward)
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp == torch.float16)
    return Learner(D.wrap(unit, runtime.device, train.sync_bn), teacher, optimizer, scaler, runtime, own)


def random_learner(model_name: str, method_name: str, num_classes: int, options: dict[str, Any] | None = None,
                   runtime: Runtime | None = None, train: TrainConfig | None = None,
                   teacher_model: str | None = None,
                   class_pixel_counts: Callable[[], torch.Tensor] | None = None) -> Learner:
    """A Learner built as the Trainer builds one, with random weights and a random frozen teacher
    of `teacher_model` (default: the student's architecture): for cost, not accuracy. Without
    class counts every class counts the same (a class split changes which classes an expert owns,
    not its size). The method reads no files its options name (a stage's checkpoint): it keeps its
    own initial state, as random as the weights."""
    torch.manual_seed(0)
    counts = class_pixel_counts or (lambda: torch.ones(num_classes, dtype=torch.long))
    return build_learner(ModelConfig(name=model_name), method_name, options or {}, num_classes,
                         runtime or Runtime(torch.device("cpu")), train or TrainConfig(), counts,
                         lambda: freeze(build_model(teacher_model or model_name, num_classes)),
                         read_artefacts=False)
