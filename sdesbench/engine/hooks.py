"""The Trainer's duties around the step, as hooks (in the style of detectron2's `HookBase`).

The loop itself only runs `step.train_step` and advances the schedule; everything else happens
in hooks, called in list order before training and after each step, and in reverse order after
training (like nested context managers unwinding, so the signal handlers are restored last,
after the final evaluation they protect):

- `SignalHook`: SIGINT/SIGTERM set `trainer.stop_signal`; the loop stops after the current step.
- `LogHook`: every `train.log_every` iterations publishes the training scalars (loss terms, total,
  lr, images/s) and writes every published event to `log.jsonl`.
- `TensorBoardHook`: every published event as TensorBoard scalars in `<out>/tensorboard`.
- `ProgressHook`: the rich progress bar.
- `PeriodicEvaluationHook`: with `eval.every`, validation every `eval.every` iterations and at the
  last one (`trainer.history`, published as "val" events), without touching the training.
- `CheckpointHook`: `checkpoints/last.pt` every `train.checkpoint_every` iterations, at the end,
  and when a signal stops the run.
- `FinalEvaluationHook`: the whole-image evaluation once the schedule is complete (the table's
  metric), with per-image counts.

Events: a hook that measures something calls `trainer.publish(event)`, a dict with "iter" and either
training scalars or a section ("val": {...}); every hook's `on_event` sees it (the writers: log.jsonl,
TensorBoard). `event_scalars` names the TensorBoard tags: "train/<key>" for a training scalar,
"<section>/<key>/..." for the numbers of a section (None, an absent class, is skipped).

A new duty is a new hook appended in `Trainer.build_hooks`. Hooks receive the `Trainer` and read
and write its public state: `iteration`, `start_iter`, `total_iters`, `terms`, `last_step_s`,
`stop_signal`, `failed`, `final_metrics`, `history`, `learner`, `cfg`, `out`.
"""
from __future__ import annotations

import json
import signal
import threading
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sdesbench.data.base import EvalView
from sdesbench.engine import distributed as D
from sdesbench.engine.evaluate import console, evaluate
from sdesbench.engine.record import Evaluation, Scores
from sdesbench.errors import SdesbenchError
from sdesbench.io import append_bytes, disk_full_as_error, write_text


class HookBase:
    def before_train(self, trainer: Any) -> None:
        pass

    def after_step(self, trainer: Any) -> None:
        pass

    def after_train(self, trainer: Any) -> None:
        """Runs however the loop ended (completed, stopped by a signal, failed)."""

    def on_event(self, trainer: Any, event: dict[str, Any]) -> None:
        """An event another hook published (`trainer.publish`)."""


def event_scalars(event: dict[str, Any]) -> dict[str, float]:
    """TensorBoard tag -> value of an event (module docstring)."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for key, value in event.items():
        if key != "iter":
            walk(key if isinstance(value, dict) else f"train/{key}", value)
    return out


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
    """`log.jsonl`: one line per event, i.e. per logged iteration ({"iter", "lr", "loss", <terms>,
    "images_per_s"}) and per periodic evaluation ({"iter", "val": {...}}). A resumed run first drops
    the lines written after its checkpoint (a killed run logged them, the resumed run logs them
    again); a fresh run starts an empty log."""

    def before_train(self, trainer):
        self.file = None
        self.images = 0
        self.seconds = 0.0
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
        write_text(path, "".join(kept))
        self.path, self.file = path, open(path, "ab", buffering=0)  # unbuffered: see io.append_bytes

    def after_step(self, trainer):
        self.images += trainer.cfg.data.batch_size * D.world_size()
        self.seconds += trainer.last_step_s
        if not trainer.at_interval(trainer.cfg.train.log_every):
            return
        total = round(float(sum(trainer.terms.values()).detach()), 5)
        rate = round(self.images / self.seconds, 3) if self.seconds > 0 else None
        self.images, self.seconds = 0, 0.0
        trainer.publish({"iter": trainer.iteration, "lr": trainer.lr, "loss": total, **log_values(trainer),
                         "images_per_s": rate})

    def on_event(self, trainer, event):
        if self.file is not None:
            append_bytes(self.file, (json.dumps(event) + "\n").encode(), self.path)

    def after_train(self, trainer):
        if self.file is not None:
            self.file.close()
            self.file = None


class TensorBoardHook(HookBase):
    """TensorBoard event files in `<out>/tensorboard` (`output.tensorboard`): the scalars of every
    published event at its iteration. A resumed run purges what the killed run wrote after its
    checkpoint (`purge_step`), as the log does. A full disk is one `StorageError` naming the folder:
    the writer's background thread fails first, and its error is raised again by the writer's next
    call in the main thread, so the thread's own traceback is not printed."""

    def before_train(self, trainer):
        self.writer = None
        if not D.is_main() or not trainer.cfg.output.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # a third-party dependency, not the project's code
            raise SdesbenchError("output.tensorboard=true needs the tensorboard package (pip install tensorboard), "
                                 "or set output.tensorboard=false") from None
        self.folder = trainer.out / "tensorboard"
        self.thread_excepthook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread
        with disk_full_as_error(self.folder):
            self.writer = SummaryWriter(str(self.folder),
                                        purge_step=trainer.start_iter + 1 if trainer.start_iter else None)

    def _quiet_writer_thread(self, args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":  # tensorboard's event-file writer thread
            self.thread_excepthook(args)

    def on_event(self, trainer, event):
        if self.writer is None:
            return
        try:
            with disk_full_as_error(self.folder):
                for tag, value in event_scalars(event).items():
                    self.writer.add_scalar(tag, value, event["iter"])
        except BaseException:
            self.writer = None  # its thread has stopped: closing it would raise the same error again
            raise

    def after_train(self, trainer):
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with disk_full_as_error(self.folder):
                writer.close()
        if hasattr(self, "thread_excepthook"):
            threading.excepthook = self.thread_excepthook


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


def evaluation_entry(trainer: Any, metrics: dict[str, dict[str, Any]], images: int) -> Evaluation:
    student = metrics["student"]
    return Evaluation(trainer.iteration, images, student["miou"], student["pixel_acc"],
                      dict(zip(trainer.class_names, student["per_class_iou"])),
                      {k: Scores(v["miou"], v["pixel_acc"]) for k, v in metrics.items() if k != "student"})


class PeriodicEvaluationHook(HookBase):
    """With `eval.every`: the student (and e.g. Ens-T) evaluated every `eval.every` iterations and at
    the last one, on the first `eval.every_max_images` images of the evaluation set, appended to
    `trainer.history` and published as a "val" event (log.jsonl, TensorBoard).

    It leaves the training exactly as it was: the random-number state is restored after each
    evaluation (its data loader draws a seed from it) and so is every module's train/eval mode. At
    the last iteration, when the periodic images are the final evaluation's, the final evaluation is
    reused rather than run twice; this hook's `after_train` therefore runs after the final one (it
    comes before `FinalEvaluationHook` in the list). It comes before `CheckpointHook` so that a
    checkpoint written at an evaluated iteration holds that evaluation (resume keeps the history)."""

    def __init__(self, every: int | None):
        self.every = every

    def images(self, trainer: Any) -> int:
        limits = [len(trainer.eval_set), trainer.cfg.eval.max_images, trainer.cfg.eval.every_max_images]
        return min(n for n in limits if n is not None)

    def due(self, trainer: Any) -> bool:
        evaluated = trainer.history and trainer.history[-1].iteration == trainer.iteration
        return bool(self.every) and trainer.iteration % self.every == 0 and not evaluated

    def before_train(self, trainer):
        # a run resumed from a checkpoint whose own evaluation a signal cut short evaluates it now
        if trainer.start_iter and trainer.iteration < trainer.total_iters and self.due(trainer):
            self.evaluate(trainer)

    def after_step(self, trainer):
        if trainer.iteration < trainer.total_iters and self.due(trainer):
            self.evaluate(trainer)

    def after_train(self, trainer):
        done = trainer.history and trainer.history[-1].iteration == trainer.iteration
        if not self.every or trainer.final_metrics is None or done:
            return
        if self.images(trainer) == trainer.final_images:
            self.add(trainer, evaluation_entry(trainer, trainer.final_metrics, trainer.final_images))
        else:
            self.evaluate(trainer)

    def evaluate(self, trainer: Any) -> None:
        learner = trainer.learner
        device = learner.runtime.device
        modes = [(m, m.training) for m in learner.plain_unit.modules()]
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        n = self.images(trainer)
        with torch.random.fork_rng(devices=cuda):
            D.broadcast_state(learner.plain_unit)  # rank 0's BatchNorm statistics (DDP broadcasts them anyway)
            metrics = run_evaluation(trainer, EvalView(trainer.eval_set, n))
        for module, mode in modes:
            module.training = mode
        if metrics is not None:  # None: a signal arrived during the evaluation
            self.add(trainer, evaluation_entry(trainer, metrics, n))

    def add(self, trainer: Any, entry: Evaluation) -> None:
        trainer.history.append(entry)
        val: dict[str, Any] = {"images": entry.images, "miou": entry.miou, "pixel_acc": entry.pixel_acc,
                               "per_class_iou": entry.per_class_iou}
        val.update({k: {"miou": v.miou, "pixel_acc": v.pixel_acc} for k, v in entry.extra.items()})
        trainer.publish({"iter": entry.iteration, "val": val})


class FinalEvaluationHook(HookBase):
    """Evaluates the finished schedule (the table metric), with the per-image counts a bootstrap
    needs. A signal during the evaluation stops it: the run is then recorded as interrupted, and
    `--resume` runs only the evaluation again."""

    def __init__(self, show_progress: bool):
        self.show_progress = show_progress

    def after_train(self, trainer):
        if trainer.failed or trainer.stop_signal is not None or trainer.iteration < trainer.total_iters:
            return
        D.broadcast_state(trainer.learner.plain_unit)  # rank 0's BatchNorm statistics on every rank
        view = EvalView(trainer.eval_set, trainer.cfg.eval.max_images)
        trainer.final_images = len(view)
        trainer.final_metrics = run_evaluation(trainer, view, show_progress=self.show_progress, per_image=True)


def run_evaluation(trainer: Any, view: EvalView, **extra: Any) -> Any:
    """`evaluate` of the run's model on `view` as its config asks (batch size, precision, eval scale or
    size, loader workers); it stops early when a signal stops the run (None then)."""
    learner, cfg = trainer.learner, trainer.cfg
    return evaluate(learner.model, view, trainer.num_classes, learner.runtime.device, cfg.eval.batch_size,
                    method=learner.method, amp=learner.runtime.amp,
                    should_stop=lambda: trainer.stop_signal is not None, scale=cfg.eval.scale, size=cfg.eval.size,
                    workers=cfg.eval.loader_workers(cfg.data), **extra)


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
