"""What the training loop and its hooks share, typed: `TrainState` (iteration, loss terms, periodic
evaluations, the final evaluation, what stopped the run), `TrainerView` (what a hook may read and call) and
the hook contract (`HookBase`, `Priority`, `Hooks`).

A hook receives a `TrainerView`, never the Trainer (as detectron2's `HookBase.trainer` and mmengine's
`Hook(runner)`, narrowed to what a duty around the step needs): it reads the configuration, the output
folder, the learner, the evaluation set and its class names, and writes only `view.state`'s fields (its
docstring names who writes what); it acts through three calls, `save_checkpoint`, `save_best` and
`publish`. It never changes the step itself, so a hook is never part of a run's identity.

The loop. `before_train`, then per iteration the step and `after_step`; once the schedule is complete
(not stopped by a signal, not failed), the Trainer runs the final evaluation (the table's metric) itself,
writes `state.final`, and calls `after_final_evaluation`, where hooks observe it (the periodic
evaluation reuses it at the last iteration, the progress lines print it); `after_train` runs however the
loop ended. Every stage is a method of `Hooks`, called directly.

Order. Every hook declares a `priority` (lower first, as mmengine's `Hook.priority`): `before_train`,
`after_step`, `after_final_evaluation` and `on_event` run in that order, `after_train` in the reverse order,
as nested context managers unwind (the signal handlers installed first are restored last, the writers
opened early close after every hook that publishes). Hooks of equal priority keep the order they were
given in (`Trainer.build_hooks`: the built-in ones, then `train.hooks`).

State. A hook that holds state across iterations offers `state_dict`/`load_state_dict` (as detectron2's
`HookBase` does); the checkpoint carries them by hook name, so `--resume` continues each hook where it
stopped. A method's own state is its modules' `state_dict` (buffers such as memory queues included), its
random-number generator's state (one per rank, `method_generators`) and, for a method that updates
parameters itself, its optimizer's (engine/step.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from sdesbench.config import RunConfig
from sdesbench.data.base import SegDataset
from sdesbench.engine.record import Evaluation, Timings
from sdesbench.engine.step import Learner


@dataclass
class FinalEvaluation:
    """The evaluation of the finished schedule (the table metric): prediction name -> metrics, on `images`."""

    metrics: dict[str, dict[str, Any]]
    images: int


@dataclass
class TrainState:
    """What the loop and the hooks share. The loop writes `iteration`, `terms`, `own_terms`, the step times and
    `final`; `SignalHook` writes `stop_signal`; `PeriodicEvaluationHook` appends to `history`."""

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
    final: FinalEvaluation | None = None  # the Trainer's final evaluation, once the schedule is complete

    def at_interval(self, every: int) -> bool:
        """Whether the iteration just finished is a multiple of `every`, or the last one."""
        return self.iteration % every == 0 or self.iteration == self.total_iters

    @property
    def mean_iter_s(self) -> float | None:
        """This session's mean iteration time, loader waits included (what an ETA extrapolates)."""
        done = self.iteration - self.start_iter
        return self.timings.train_s / done if done > 0 else None

    @property
    def schedule_complete(self) -> bool:
        """Every iteration done, and nothing stopped the run: the final evaluation is due."""
        return not self.failed and self.stop_signal is None and self.iteration >= self.total_iters


@dataclass(frozen=True)
class TrainerView:
    """What a hook sees of the Trainer (module docstring): read the fields, write only `state`'s, act through
    the three calls. The Trainer builds one after its setup and hands the same view to every hook."""

    state: TrainState
    cfg: RunConfig
    out: Path  # the run's folder (`output.dir`)
    learner: Learner  # student, method, teacher, optimizer, runtime (engine/step.py): read, never stepped
    eval_set: SegDataset
    class_names: list[str]
    num_classes: int
    show_progress: bool  # the progress bar or lines are wanted (on rank 0)
    save_checkpoint: Callable[..., None]  # `checkpoints/last.pt`; keep_copy=True also `iter_<k>.pt`
    save_best: Callable[[], None]  # `checkpoints/best.pt` (`train.keep_best`)
    publish: Callable[[dict[str, Any]], None]  # a measurement to every hook's `on_event` (engine/hooks.py)

    @property
    def lr(self) -> float:
        """The student's learning rate for the next step (its first parameter group's)."""
        return self.learner.optimizer.param_groups[0]["lr"]


class Priority(IntEnum):
    """Hook priorities (lower runs first, and last in `after_train`)."""

    HIGHEST = 0
    VERY_HIGH = 10
    HIGH = 30
    NORMAL = 50
    LOW = 70
    VERY_LOW = 90
    LOWEST = 100


class HookBase:
    """A duty around the training step (module docstring). It receives the `TrainerView` and never changes
    the step itself. A hook with options declares them as a dataclass `Options` and takes it in `__init__`
    (`train.hooks: [{name: ..., <option>: ...}]`, validated as a method's options are)."""

    priority: ClassVar[int] = Priority.NORMAL
    name: ClassVar[str]  # its registered name (`HOOKS.register`), where it has one

    @property
    def state_key(self) -> str:
        """The key of this hook's state in a checkpoint."""
        return type(self).__name__

    def before_train(self, trainer: TrainerView) -> None:
        pass

    def after_step(self, trainer: TrainerView) -> None:
        pass

    def after_final_evaluation(self, trainer: TrainerView) -> None:
        """The Trainer's final evaluation is in `trainer.state.final` (only a complete schedule gets here)."""

    def after_train(self, trainer: TrainerView) -> None:
        """Runs however the loop ended (completed, stopped by a signal, failed)."""

    def on_event(self, trainer: TrainerView, event: dict[str, Any]) -> None:
        """An event a hook published (`trainer.publish`)."""

    def state_dict(self) -> dict[str, Any]:
        """What this hook must remember across a resume (plain values or tensors); {} for none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called before `before_train` on a resumed run, with what `state_dict` returned."""


class Hooks:
    """A run's hooks in the order they run (by priority, ties in the given order), with one method per
    stage (module docstring)."""

    def __init__(self, hooks: list[HookBase]):
        self.hooks = sorted(hooks, key=lambda h: h.priority)
        self.started: list[HookBase] = []  # those whose `before_train` completed: `after_train` closes them

    def __iter__(self):
        return iter(self.hooks)

    def before_train(self, view: TrainerView) -> None:
        for hook in self.hooks:
            hook.before_train(view)
            self.started.append(hook)

    def after_step(self, view: TrainerView) -> None:
        for hook in self.hooks:
            hook.after_step(view)

    def after_final_evaluation(self, view: TrainerView) -> None:
        for hook in self.hooks:
            hook.after_final_evaluation(view)

    def on_event(self, view: TrainerView, event: dict[str, Any]) -> None:
        for hook in self.hooks:
            hook.on_event(view, event)

    def after_train(self, view: TrainerView) -> None:
        """In reverse, over the hooks whose `before_train` completed (as nested context managers unwind: a hook
        that never started, because one before it raised, e.g. a logger's missing package, is not closed, and the
        first error stays the one raised); every one runs even when one raises (the first error is re-raised once
        all have run: signal handlers are always restored)."""
        error: BaseException | None = None
        for hook in reversed(self.started):
            try:
                hook.after_train(view)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the other hooks ran
                error = error or e
        if error is not None:
            raise error

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Each hook's state that is not empty, by `state_key`."""
        return {h.state_key: s for h in self.hooks if (s := h.state_dict())}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        for hook in self.hooks:
            if hook.state_key in states:
                hook.load_state_dict(states[hook.state_key])
