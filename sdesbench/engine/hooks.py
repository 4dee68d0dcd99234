"""The Trainer's duties around the step, as hooks (in the style of detectron2's `HookBase`).

The loop itself only runs `step.train_step` and advances the schedule; everything else happens
in hooks, called in list order before training and after each step, and in reverse order after
training (like nested context managers unwinding, so the signal handlers are restored last,
after the final evaluation they protect):

- `SignalHook`: SIGINT/SIGTERM set `trainer.stop_signal`; the loop stops after the current step.
- `LogHook`: loss terms, total and lr to `log.jsonl` every `train.log_every` iterations.
- `ProgressHook`: the rich progress bar.
- `CheckpointHook`: `checkpoints/last.pt` every `train.checkpoint_every` iterations, at the end,
  and when a signal stops the run.
- `FinalEvaluationHook`: the whole-image evaluation once the schedule is complete.

A new duty (periodic evaluation, TensorBoard) is a new hook appended in `Trainer.build_hooks`.
Hooks receive the `Trainer` and read and write its public state: `iteration`, `start_iter`, `total_iters`,
`terms`, `last_step_s`, `stop_signal`, `failed`, `final_metrics`, `learner`, `cfg`, `out`.
"""
from __future__ import annotations

import json
import signal
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sdesbench.data.base import EvalView
from sdesbench.engine import distributed as D
from sdesbench.engine.evaluate import console, evaluate


class HookBase:
    def before_train(self, trainer: Any) -> None:
        pass

    def after_step(self, trainer: Any) -> None:
        pass

    def after_train(self, trainer: Any) -> None:
        """Runs however the loop ended (completed, stopped by a signal, failed)."""


class SignalHook(HookBase):
    def before_train(self, trainer):
        def on_signal(signum, frame):
            trainer.stop_signal = signum

        self.previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def after_train(self, trainer):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def log_values(trainer: Any) -> dict[str, float]:
    return {k: round(float(v.detach()), 5) for k, v in trainer.terms.items()}


class LogHook(HookBase):
    """`log.jsonl`: one line per logged iteration. A resumed run first drops the lines written after
    its checkpoint (a killed run logged them, the resumed run logs them again); a fresh run starts
    an empty log."""

    def before_train(self, trainer):
        self.file = None
        if not D.is_main():
            return
        path = trainer.out / "log.jsonl"
        kept = []
        if trainer.start_iter > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if int(json.loads(line)["iter"]) <= trainer.start_iter:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut by a kill: dropped
                    continue
        path.write_text("".join(kept))
        self.file = open(path, "a")

    def after_step(self, trainer):
        if self.file is None or not trainer.at_interval(trainer.cfg.train.log_every):
            return
        total = round(float(sum(trainer.terms.values()).detach()), 5)
        line = {"iter": trainer.iteration, "lr": trainer.lr, "loss": total, **log_values(trainer)}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def after_train(self, trainer):
        if self.file is not None:
            self.file.close()


class ProgressHook(HookBase):
    def __init__(self, enabled: bool):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[terms]}"), console=console, disable=not enabled)

    def before_train(self, trainer):
        self.progress.start()
        self.task = self.progress.add_task(f"{trainer.cfg.method.name}/{trainer.cfg.model.name}",
                                           total=trainer.total_iters, completed=trainer.iteration, rate="", terms="")

    def after_step(self, trainer):
        if trainer.at_interval(trainer.cfg.train.log_every):
            terms = " ".join(f"{k}={v:.4f}" for k, v in log_values(trainer).items())
            self.progress.update(self.task, terms=f"{terms} lr={trainer.lr:.2e}",
                                 rate=f"{1 / max(trainer.last_step_s, 1e-9):.2f} it/s")
        self.progress.update(self.task, completed=trainer.iteration)

    def after_train(self, trainer):
        self.progress.stop()


class CheckpointHook(HookBase):
    """`checkpoints/last.pt`; with `train.keep_checkpoints_every` also a copy `iter_<k>.pt` kept at
    every multiple k (to measure along training, e.g. `sdesbench balance`)."""

    def after_step(self, trainer):
        if trainer.at_interval(trainer.cfg.train.checkpoint_every):
            keep = trainer.cfg.train.keep_checkpoints_every
            trainer.save_checkpoint(keep_copy=bool(keep) and trainer.iteration % keep == 0)

    def after_train(self, trainer):
        if trainer.stop_signal is not None and trainer.last_checkpoint_iter != trainer.iteration:
            trainer.save_checkpoint()


class FinalEvaluationHook(HookBase):
    """Evaluates the finished schedule (the table metric). A signal during the evaluation stops it:
    the run is then recorded as interrupted, and `--resume` runs only the evaluation again."""

    def __init__(self, show_progress: bool):
        self.show_progress = show_progress

    def after_train(self, trainer):
        if trainer.failed or trainer.stop_signal is not None or trainer.iteration < trainer.total_iters:
            return
        learner, cfg = trainer.learner, trainer.cfg
        D.broadcast_state(learner.plain_unit)  # rank 0's BatchNorm statistics on every rank
        trainer.final_metrics = evaluate(
            learner.model, EvalView(trainer.eval_set, cfg.eval.max_images), trainer.num_classes,
            learner.runtime.device, cfg.eval.batch_size, method=learner.method, amp=learner.runtime.amp,
            show_progress=self.show_progress, should_stop=lambda: trainer.stop_signal is not None,
            scale=cfg.eval.scale, size=cfg.eval.size, workers=cfg.eval.loader_workers(cfg.data))


def run_hooks(hooks: list[HookBase], stage: str, trainer: Any) -> None:
    """Call `stage` on every hook; after training, in reverse order, and every hook runs even when
    one raises (the first error is re-raised once all have run: signal handlers are always restored)."""
    if stage != "after_train":
        for hook in hooks:
            getattr(hook, stage)(trainer)
        return
    error: BaseException | None = None
    for hook in reversed(hooks):
        try:
            hook.after_train(trainer)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other hooks ran
            error = error or e
    if error is not None:
        raise error
