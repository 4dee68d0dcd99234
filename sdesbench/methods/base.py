"""The method interface: a distillation method is one file with one `Method` subclass.

A method
- declares its hyper-parameters as a nested `Options` dataclass (validated like the run config;
  ranges via `field(metadata=rng(lo, hi))`, cross-field checks in `check_options`);
- may add trainable modules in `__init__` (expert decoders, adapters): they are trained with
  the student and dropped at deployment (they never enter the student's state dict);
- says whether it needs a teacher (`needs_teacher`), whose outputs arrive as `teacher_out`;
- returns from `loss_terms` a dict of named, already weighted loss terms; the Trainer sums them,
  logs each one, and checks each for NaN/Inf;
- may return extra predictions to evaluate from `eval_predictions` (e.g. SDES's Ens-T).

Every loss term the suite computes uses the same conventions: ignore index 255, mean over the
valid (non-ignored) pixels unless the method's docstring says otherwise, and model outputs in
the dict form of `sdesbench.models.base` (`logits`, `aux`, `decoder_feature`, `stages`).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from sdesbench.config import from_dict
from sdesbench.errors import ConfigError
from sdesbench.models.base import SegmentationModel
from sdesbench.registry import Registry

# keys of the `method` section that are not options (`config.method_section`): an option of that name could
# never be set
RESERVED_OPTION_NAMES = ("name", "options")


def check_method(name: str, cls: Any) -> None:
    """What registering a method checks (built-ins and plugins alike), each failure one ConfigError line:
    it is a `Method` subclass whose `Options` is a dataclass; no option is named like a key of the
    `method` section; no option is declared by two unrelated `Options` bases (a composite method's parts,
    e.g. `class Options(KLOptions, CWDOptions)`: one value would silently set both parts' option, which is
    why every part prefixes its options with its own name, `kd_temperature`, `cwd_tau`)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method {name!r}: {getattr(cls, '__qualname__', cls)!r} is not a subclass of "
                          "sdesbench.methods.base.Method")
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ConfigError(f"method {name!r}: its Options must be a dataclass (decorate it with @dataclass), "
                          f"got {getattr(options, '__qualname__', type(options).__name__)}")
    for f in dataclasses.fields(options):
        if f.name in RESERVED_OPTION_NAMES:
            raise ConfigError(f"method {name!r}: option {f.name!r} collides with the method section's own key "
                              f"method.{f.name}; rename it")
        declared = [k for k in options.__mro__ if f.name in inspect.get_annotations(k)]
        for i, a in enumerate(declared):
            for b in declared[i + 1:]:
                if not (issubclass(a, b) or issubclass(b, a)):
                    raise ConfigError(f"method {name!r}: option {f.name!r} is declared by both {a.__qualname__} "
                                      f"and {b.__qualname__}, so one value would set both; prefix each with its "
                                      "own term's name")


METHODS = Registry("method", names_entries=True, check=check_method)  # a method's `name` is its registered name


@dataclass
class MethodContext:
    """What a method may know about the run when it is built."""

    model: SegmentationModel  # the student (to read stage channels or build decoders; do not re-register it)
    num_classes: int
    total_iters: int
    class_pixel_counts: Callable[[], torch.Tensor]  # per-class training-pixel counts (lazy, cached)
    teacher: SegmentationModel | None = None
    seed: int = 0


@dataclass
class StepInfo:
    iteration: int  # 0-based index of the current iteration
    total_iters: int


class Method(nn.Module):
    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    teacher_free: ClassVar[bool] = True  # the paper's "TF" column

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any, ctx: MethodContext):
        super().__init__()
        self.opts = options
        self.num_classes = ctx.num_classes

    @classmethod
    def parse_options(cls, options: dict[str, Any], num_classes: int | None = None) -> Any:
        opts = from_dict(cls.Options, options or {}, prefix="method")
        cls.check_options(opts, num_classes)
        return opts

    @classmethod
    def check_options(cls, opts: Any, num_classes: int | None) -> None:
        """Cross-field and dataset-dependent checks; raise ConfigError with one line."""

    @classmethod
    def option_docs(cls) -> list[tuple[str, Any]]:
        return [(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(cls.Options)]

    def loss_terms(self, student_out: dict[str, Any], labels: torch.Tensor, step: StepInfo,
                   teacher_out: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def eval_predictions(self, student_out: dict[str, Any], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra logits to score beside the student's (name -> B x C x H x W)."""
        return {}

    # --- a method that updates some of its own parameters itself (SKD's discriminator) -----------------
    # It returns their optimizer from `own_optimizer` (those parameters then leave the main optimizer),
    # keeps what its update needs (detached) in `loss_terms`, and returns that update's loss terms from
    # `own_loss_terms`. The one training step (engine/step.py `train_step`) runs it after the student's
    # update, in the same step and under the same precision and gradient scaler; the optimizer's state
    # travels in the checkpoint, so a resumed run continues it exactly.

    def own_optimizer(self, train: Any) -> torch.optim.Optimizer | None:
        """The optimizer of the parameters this method updates itself, or None (`train`: the TrainConfig)."""
        return None

    def own_loss_terms(self, step: StepInfo) -> dict[str, torch.Tensor]:
        """The loss of this method's own update, from what `loss_terms` kept in this step."""
        raise NotImplementedError(f"{self.name} has no update of its own")
