"""The method contract: a distillation method is one file with one `Method` subclass.

docs/extending.md is the page a method's author reads; this docstring is its summary.

Declared on the class (read by the Trainer, the CLI, the tests and the docs; nothing else lists methods):
- `name`: set by `@METHODS.register(name)`; `needs_teacher`; `teacher_free` (the paper's "TF" column);
- `logged_terms`: every term name the log shows with the default options on a model without an aux head,
  over the whole schedule (each stage's terms of a staged method, an own update's terms included); a model
  with an aux head adds `aux`-named counterparts;
- `conformance`: the fixture under tests/conformance/ that checks it against its public reference code,
  or None with `no_conformance_because` saying why there is none;
- `option_prefix`: the prefix of the option names the method adds (`cwd_`, `kd_`), so that a composite
  can put several methods' options in one dataclass without a clash ("" only for older methods whose
  names predate the rule);
- `stage`: a `StageRun` when the method distils from the artefact of a run of its own that must finish
  first (MasKD's stage-1 receptive tokens), which `sdesbench run` plans like a teacher (docs/extending.md);
- `student_is_teacher`: the run's network is the trained teacher itself, frozen in eval mode, and the method's
  own parameters are all that trains (MasKD's stage 1 learns its receptive tokens so): the run's `model` is
  its `teacher.model`, loaded from `teacher.checkpoint`, and no second teacher forward runs.

Inputs. `loss_terms(student_out, labels, step, teacher_out)`: `student_out` (and the frozen teacher's
`teacher_out`, None unless `needs_teacher`) is the output dict of `sdesbench.models.base`: `logits`
(B x C x H x W, at the input's resolution), `aux` (auxiliary-head logits or None), `decoder_feature`
(B x D x h x w, the map fed to the classifier) and `stages` (the encoder's stage maps, shallow to deep);
`labels` is B x H x W with 255 for ignored pixels; `step` gives the iteration (0-based) and the total.

Options. A nested `Options` dataclass, validated like the run config (`method.<option>` names in its
errors): `Literal` choices, ranges via `field(metadata=rng(lo, hi, doc=...))`, cross-field and
dataset-dependent checks in `check_options`.

Random numbers. `self.generator` is a CPU `torch.Generator` seeded from the run seed and the process's
rank (`method_seed`); the Trainer saves its state in the checkpoint for every rank and restores it on
resume, so a mask drawn at iteration k is the same after a resume and differs between DDP ranks. Draw
with `self.rand(...)`/`self.randn(...)` (or `generator=self.generator`). Torch's global generator is for
what must repeat a reference's draws (CIRKD's queues); it is saved too, but it is the same on every rank.

Method-owned modules. Trainable modules made in `__init__` (experts, adapters) are trained with the student
by the one SGD optimizer and dropped at deployment (never in the student's state dict); `param_groups`
gives those needing their own learning rate their groups. A group with a `max_grad_norm` entry has the L2 norm
of its parameters' gradients clipped to it in every step (Af-DCD's loss module, clipped to 15 by its reference):
the one training step applies `torch.nn.utils.clip_grad_norm_` per such group after the backward pass (on the
unscaled gradients under fp16) and before the optimizer's step. A method that updates parameters itself (SKD's
discriminator) returns their optimizer from `own_optimizer` and that update's terms from `own_loss_terms`.

Under DDP the student and the method's modules are one DistributedDataParallel unit: gradients are
averaged, nothing else is gathered for a method; one that needs other ranks' tensors (CIRKD's memory
queues) gathers them itself (`cirkd.gather_batch`, whose backward returns each rank its slice's gradient).

Feature maps. `methods/features.py` names the maps a method may distil (`FeatureMap`), reads them
(`feature_map`), gives their channels in student and teacher and the 1x1 `channel_adapter` between them, and
is the one way to add CIRKD's pixel KD to a method (`class MineKD(PixelKD, Mine)`).

Outputs. `loss_terms` returns a dict of named, already weighted loss terms; the Trainer sums them, logs
each one, and checks each for NaN/Inf. `eval_predictions` may return extra logits to score beside the
student's (e.g. SDES's Ens-T).

Every loss term the suite computes uses the same conventions: ignore index 255, mean over the valid
(non-ignored) pixels unless the method's docstring says otherwise.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from sdesbench.validate import from_dict
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
    stage = getattr(cls, "stage", None)
    if stage is not None:
        if not isinstance(stage, StageRun):
            raise ConfigError(f"method {name!r}: its stage must be a sdesbench.methods.base.StageRun, got "
                              f"{type(stage).__name__}")
        names = {f.name for f in dataclasses.fields(options)}
        for option in (stage.artefact_option, *stage.shared_options):
            if option not in names:
                raise ConfigError(f"method {name!r}: its stage names option {option!r}, which its Options lacks")
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
    seed: int = 0  # the run's seed (train.seed)
    rank: int = 0  # this process's rank under DDP (0 outside it)
    # whether the method may read the files its options name (MasKD's stage-1 checkpoint): False where it is
    # built with random weights for a cost measurement, or to receive a checkpoint's own state (a restore)
    read_artefacts: bool = True


def method_seed(seed: int, rank: int) -> int:
    """The seed of a method's generator: a hash of (run seed, rank), so that neighbouring seeds and ranks give
    unrelated streams, and none of them equals the global generator's (seeded with the run seed alone)."""
    return int.from_bytes(hashlib.sha256(f"sdesbench.method:{seed}:{rank}".encode()).digest()[:8], "little")


@dataclass(frozen=True)
class StageRun:
    """A run a method's student run depends on (MasKD's stage 1: receptive tokens learnt on the frozen teacher).

    `sdesbench run` plans it once per distinct configuration, after the row's teacher and before the row: its
    configuration is the row's (network, data, protocol, teacher, seed) with `method` as its method, given the
    row's values of the options named in `shared_options`, then `settings` merged over it (e.g.
    `{"train": {"lr": 0.1}}`); its iterations are the row's times `iters_fraction` (rounded, at least 1), so a
    stage the reference trains for a quarter of the student's schedule keeps that ratio at every preset. The row's option `artefact_option` receives the path of the stage run's
    final checkpoint (`checkpoints/last.pt`), as `teacher.checkpoint` receives the teacher's; the path holds the
    stage run's key, so a changed stage configuration is another student run and the older record is stale."""

    method: str  # the registered method the stage run trains
    artefact_option: str  # the dependant's option (a `str | None` path) that receives the stage's checkpoint
    shared_options: tuple[str, ...] = ()  # the dependant's options the stage run is given too (same values)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # merged over the stage run's configuration
    iters_fraction: float = 1.0  # the stage run's train.iters over the row's


@dataclass
class StepInfo:
    iteration: int  # 0-based index of the current iteration
    total_iters: int


class Method(nn.Module):
    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    teacher_free: ClassVar[bool] = True  # the paper's "TF" column
    logged_terms: ClassVar[tuple[str, ...]] = ()  # every term it logs (module docstring)
    conformance: ClassVar[str | None] = None  # its fixture under tests/conformance/, e.g. "kl.json"
    no_conformance_because: ClassVar[str] = ""  # why there is no fixture, when `conformance` is None
    option_prefix: ClassVar[str] = ""  # the prefix of the option names it adds, e.g. "cwd_"
    stage: ClassVar[StageRun | None] = None  # a run of its own this method's run depends on (StageRun)
    student_is_teacher: ClassVar[bool] = False  # its run's network is the frozen teacher (module docstring)

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any, ctx: MethodContext):
        super().__init__()
        self.opts = options
        self.num_classes = ctx.num_classes
        # the method's random numbers (module docstring); its state travels in the checkpoint, per rank
        self.generator = torch.Generator().manual_seed(method_seed(ctx.seed, ctx.rank))

    def rand(self, *size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform [0, 1) numbers from the method's generator (drawn on the CPU, then moved to `device`,
        so a draw is the same on every device)."""
        return torch.rand(size, generator=self.generator).to(device)

    def randn(self, *size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Standard normal numbers from the method's generator (as `rand`)."""
        return torch.randn(size, generator=self.generator).to(device)

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups for method-owned parameters that need their own settings, e.g.
        `[{"params": list(self.adapter.parameters()), "lr": 10 * base_lr}]` (`base_lr`: train.lr). Their
        parameters leave the main group; every group follows the poly schedule. A group may carry
        `"max_grad_norm": x` (x > 0): the training step clips the L2 norm of that group's gradients to x before
        each update (`engine/step.py`, `clip_declared_grad_norms`). Default: none."""
        return []

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
