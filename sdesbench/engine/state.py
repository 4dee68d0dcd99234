"""What the training loop and its hooks share, typed: `TrainState` (iteration, loss terms, periodic
evaluations, the final evaluation, what stopped the run) and the hook contract (`HookBase`, `Priority`).

The loop writes `iteration`, `terms`, `own_terms` and the step times; each hook reads and writes the fields
its docstring names, so who depends on whom is in the types rather than in comments: the final
evaluation is `TrainState.final`, written by `FinalEvaluationHook` and read by the periodic evaluation
(which reuses it at the last iteration) and the progress lines.

Order. Every hook declares a `priority` (lower first, as mmengine's `Hook.priority`): `before_train`
and `after_step` run in that order, `after_train` in the reverse order, as nested context managers unwind
(the signal handlers installed first are restored last, the writers opened early close after every
hook that publishes, the final evaluation runs before the hooks that read it). Hooks of equal priority
keep the order `Trainer.build_hooks` lists them in.

State. A hook that holds state across iterations offers `state_dict`/`load_state_dict` (as detectron2's
`HookBase` does); the checkpoint carries them by hook name, so `--resume` continues each hook where it
stopped. A method's own state is its modules' `state_dict` (buffers such as memory queues included), its
random-number generator's state (one per rank, `method_generators`) and, for a method that updates
parameters itself, its optimizer's (engine/step.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

import torch

from sdesbench.engine.record import Evaluation, Timings


@dataclass
class FinalEvaluation:
    """The evaluation of the finished schedule (the table metric): prediction name -> metrics, on `images`."""

    metrics: dict[str, dict[str, Any]]
    images: int


@dataclass
class TrainState:
    total_iters: int
    start_iter: int = 0  # where this session started (a resumed run: its checkpoint's iteration)
    iteration: int = 0  # iterations done
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # the last step's weighted loss terms
    own_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # a method's own update's terms (not summed)
    last_step_s: float = 0.0  # the last iteration's step
    last_data_s: float = 0.0  # and how long it waited for its batch
    timings: Timings = field(default_factory=Timings)  # this session's (record.Timings)
    stop_signal: int | None = None  # SIGINT/SIGTERM received: the loop stops after the current step
    failed: bool = False  # a NaN/Inf loss or a full disk stopped the run
    last_checkpoint_iter: int | None = None
    history: list[Evaluation] = field(default_factory=list)  # periodic evaluations (eval.every)
    final: FinalEvaluation | None = None  # FinalEvaluationHook, once the schedule is complete

    def at_interval(self, every: int) -> bool:
        """Whether the iteration just finished is a multiple of `every`, or the last one."""
        return self.iteration % every == 0 or self.iteration == self.total_iters


class Priority(IntEnum):
    """Hook priorities (lower runs first in `before_train`/`after_step`, last in `after_train`)."""

    HIGHEST = 0
    VERY_HIGH = 10
    HIGH = 30
    NORMAL = 50
    LOW = 70
    VERY_LOW = 90
    LOWEST = 100


class HookBase:
    """A duty around the training step. It receives the `Trainer` (its `state`, `cfg`, `out`, `learner`,
    datasets) and never changes the step itself."""

    priority: ClassVar[int] = Priority.NORMAL

    @property
    def name(self) -> str:
        """The key of this hook's state in a checkpoint."""
        return type(self).__name__

    def before_train(self, trainer: Any) -> None:
        pass

    def after_step(self, trainer: Any) -> None:
        pass

    def after_train(self, trainer: Any) -> None:
        """Runs however the loop ended (completed, stopped by a signal, failed)."""

    def on_event(self, trainer: Any, event: dict[str, Any]) -> None:
        """An event another hook published (`trainer.publish`)."""

    def state_dict(self) -> dict[str, Any]:
        """What this hook must remember across a resume (plain values or tensors); {} for none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called before `before_train` on a resumed run, with what `state_dict` returned."""


def ordered(hooks: list[HookBase]) -> list[HookBase]:
    """`hooks` by priority, ties in their given order."""
    return sorted(hooks, key=lambda h: h.priority)


def run_hooks(hooks: list[HookBase], stage: str, trainer: Any) -> None:
    """Call `stage` on every hook by priority; after training in reverse, and every hook runs even when one
    raises (the first error is re-raised once all have run: signal handlers are always restored)."""
    if stage != "after_train":
        for hook in ordered(hooks):
            getattr(hook, stage)(trainer)
        return
    error: BaseException | None = None
    for hook in reversed(ordered(hooks)):
        try:
            hook.after_train(trainer)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other hooks ran
            error = error or e
    if error is not None:
        raise error
