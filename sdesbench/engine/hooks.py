"""The Trainer's duties around the step, as hooks (the contract: engine/state.py, `HookBase`).

The loop itself only runs `step.train_step`, advances the schedule and, once it is complete, runs the
final evaluation; everything else happens in hooks, called by priority before training, after each
step and after the final evaluation, and in reverse after training:

| hook (registered name) | priority | does | reads / writes (`trainer.state`) |
|---|---|---|---|
| `SignalHook` (`signal`) | HIGHEST | SIGINT/SIGTERM stop the loop after the current step | writes `stop_signal` |
| `LogHook` (`log`) | VERY_HIGH | every `train.log_every` iterations publishes the training scalars (loss terms averaged over ranks, total, lr, images/s, iteration and loader-wait times, peak memory) | reads `terms`, `own_terms`, step times |
| `LoggersHook` (`loggers`) | VERY_HIGH | every published event, the configuration, the run's key and the final metrics to the loggers of `output.loggers`: `log.jsonl`, TensorBoard, MLflow, W&B (engine/loggers.py) | reads `final` |
| `ProgressHook` (`progress`) | HIGH | rich's live bar on a terminal; elsewhere one plain line per published event and one for the final evaluation | reads `final` |
| `PeriodicEvaluationHook` (`periodic_evaluation`) | NORMAL | with `eval.every`, validation every `eval.every` iterations and at the last one, without touching the training (at the last one it reuses the final evaluation when it would score the same images); with `train.keep_best`, `checkpoints/best.pt` at each new best | writes `history`; reads `final` |
| `CheckpointHook` (`checkpoint`) | LOW | `checkpoints/last.pt` every `train.checkpoint_every` iterations, at the end, and when a signal stops the run (after the periodic evaluation, so a checkpoint holds the evaluation of its iteration) | reads `history` through the checkpoint |

Writers come first so they are open before anything publishes and close after everything else. The
final evaluation is not a hook: the Trainer runs it once the schedule is complete and hooks observe it in
`after_final_evaluation`, where every hook is still open.

Events: a hook that measures something calls `trainer.publish(event)`, a dict with "iter" and either
training scalars or a section ("val": {...}); every hook's `on_event` sees it (`LoggersHook` writes it to the
loggers, which name its scalars with `loggers.event_scalars`).

Every hook is registered in `HOOKS` (engine/hook_registry.py) under a name: the ones above are every run's
(`BUILT_IN_HOOKS`), others are added by a run's `train.hooks`. A new duty is a `HookBase` subclass with a
`priority`, registered with `@HOOKS.register("name")` here or in a plugin file (docs/extending.md); it reads
the `TrainerView` it is given and never changes the step. `sdesbench list hooks` lists them all.
"""
from __future__ import annotations

import signal
import time
from datetime import timedelta
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sdesbench.console import err as console
from sdesbench.data.base import EvalView
from sdesbench.engine import distributed as D
from sdesbench.engine.evaluate import evaluate
from sdesbench.engine.hook_registry import BUILT_IN_HOOKS, HOOKS, hook_entry, hook_options
from sdesbench.engine.inference import Inference
from sdesbench.engine.loggers import LoggersHook
from sdesbench.engine.record import Evaluation, Scores, best_evaluation
from sdesbench.engine.runtime import peak_memory_mb
from sdesbench.engine.state import FinalEvaluation, HookBase, Priority, TrainState, TrainerView
from sdesbench.validate import from_dict

HOOKS.register("loggers")(LoggersHook)  # defined beside the loggers it drives (engine/loggers.py)


@HOOKS.register("signal")
class SignalHook(HookBase):
    priority = Priority.HIGHEST  # installed first, restored last: every other hook runs under it

    def before_train(self, trainer):
        def on_signal(signum, frame):
            trainer.state.stop_signal = signum

        self.previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def after_train(self, trainer):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def log_values(trainer: TrainerView) -> dict[str, float]:
    """The last step's loss terms (the student's and those of a method's own update), averaged over ranks."""
    state = trainer.state
    terms = {**state.terms, **state.own_terms}
    return {k: round(v, 5) for k, v in D.mean_over_ranks(terms, trainer.learner.runtime.device).items()}


# the keys of a training event that are measured times and memory, not the run's numbers
TIMING_KEYS = ("images_per_s", "iter_s", "data_s", "peak_memory_mb")


@HOOKS.register("log")
class LogHook(HookBase):
    """The training scalars, published every `train.log_every` iterations as one event {"iter", "lr", "loss",
    <terms>, "images_per_s", "iter_s", "data_s", "peak_memory_mb"} (a line of `log.jsonl`: engine/loggers.py).

    The times are those of the iterations since the previous logged one, loader waits included:
    `iter_s` the mean iteration time (waiting for the batch + the step), `data_s` its mean wait for
    the batch, `images_per_s` the images (all ranks) over that time. Evaluations and checkpoints in
    between are timed apart (`trainer.state.timings`) and are not in them. `peak_memory_mb`: the run's peak
    so far, since its setup (CUDA allocator, or the peak resident set on CPU: `runtime.peak_memory_mb`). Under DDP the loss terms
    are averaged over ranks (each rank's loss is on its own batch). `loss` is the sum of the student's
    terms; a method's own update's terms (a discriminator's) are logged beside it, not in it.

    State: what it has accumulated since the last logged iteration, so the first line after a resume
    covers the same iterations as without the interruption."""

    priority = Priority.VERY_HIGH

    def __init__(self) -> None:
        self.images, self.iters = 0, 0
        self.seconds, self.data_s = 0.0, 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "iters": self.iters, "seconds": self.seconds, "data_s": self.data_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images, self.iters = int(state["images"]), int(state["iters"])
        self.seconds, self.data_s = float(state["seconds"]), float(state["data_s"])

    def after_step(self, trainer):
        self.images += trainer.cfg.data.batch_size * D.world_size()
        self.iters += 1
        self.seconds += trainer.state.last_data_s + trainer.state.last_step_s
        self.data_s += trainer.state.last_data_s
        if not trainer.state.at_interval(trainer.cfg.train.log_every):
            return
        values = log_values(trainer)
        total = round(sum(values[k] for k in trainer.state.terms), 5)
        times = {"images_per_s": round(self.images / self.seconds, 3) if self.seconds > 0 else None,
                 "iter_s": round(self.seconds / self.iters, 5), "data_s": round(self.data_s / self.iters, 5),
                 "peak_memory_mb": round(peak_memory_mb(trainer.learner.runtime.device), 1)}
        self.images, self.iters, self.seconds, self.data_s = 0, 0, 0.0, 0.0
        trainer.publish({"iter": trainer.state.iteration, "lr": trainer.lr, "loss": total, **values, **times})


def run_name(trainer: TrainerView) -> str:
    """What names a run in a log shared by several: method/model and its folder's name (a sweep's
    folders are configuration hashes)."""
    return f"{trainer.cfg.method.name}/{trainer.cfg.model.name} {trainer.out.resolve().name}"


def eta_text(seconds: float | None) -> str:
    return str(timedelta(seconds=round(seconds))) if seconds is not None else "?"


def eta_s(state: TrainState) -> float | None:
    """Time left for the remaining iterations at this session's mean iteration time (loader waits
    included; evaluations and checkpoints are not)."""
    mean = state.mean_iter_s
    return mean * (state.total_iters - state.iteration) if mean is not None else None


def scores_text(miou: float, pixel_acc: float) -> str:
    return f"mIoU {100 * miou:.2f}  PA {100 * pixel_acc:.2f}"


def progress_line(trainer: TrainerView, what: str, text: str) -> str:
    """One plain log line (the format of mmengine's and detectron2's loggers): time, run, what and
    `iter/total`, then `text`."""
    width = len(str(trainer.state.total_iters))
    return (f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {run_name(trainer)}  {what} "
            f"[{trainer.state.iteration:>{width}}/{trainer.state.total_iters}]  {text}")


def training_text(trainer: TrainerView, event: dict[str, Any]) -> str:
    terms = " ".join(f"{k} {event[k]:.4f}" for k in [*trainer.state.terms, *trainer.state.own_terms])
    rate = f"{event['images_per_s']:.2f} img/s" if event["images_per_s"] is not None else "? img/s"
    return (f"loss {event['loss']:.4f} ({terms})  lr {event['lr']:.3e}  {rate}  {event['iter_s']:.3f} s/iter "
            f"(data {event['data_s']:.3f})  eta {eta_text(eta_s(trainer.state))}  peak mem {event['peak_memory_mb']:.0f} MB")


def evaluation_text(scores: dict[str, Any], images: int) -> str:
    """`scores`: {"miou", "pixel_acc", <extra prediction>: {"miou", "pixel_acc"}, ...}."""
    extra = "".join(f"  {k}: {scores_text(v['miou'], v['pixel_acc'])}" for k, v in scores.items()
                    if isinstance(v, dict) and "miou" in v)
    return f"{scores_text(scores['miou'], scores['pixel_acc'])}{extra}  ({images} images)"


@HOOKS.register("progress")
class ProgressHook(HookBase):
    """How far the run is, on stderr. On a terminal: rich's live bar (iterations, rate, elapsed time,
    ETA, loss terms and lr). Anywhere else a live bar prints nothing until it ends, so instead: one
    plain line per logged iteration (`train.log_every`: loss terms, lr, images/s, s/iter with the
    loader's share, ETA, peak memory), per periodic evaluation and for the final one. Both show the
    published training event's rates (`LogHook`: loader waits included) and `eta_s`.

    An evaluation published after the final one (`state.final` is written) is the final evaluation's
    numbers taken over by the periodic evaluation at the last iteration: the "final eval" line says it."""

    priority = Priority.HIGH

    def before_train(self, trainer):
        self.live = trainer.show_progress and console.is_terminal
        self.lines = trainer.show_progress and not self.live
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                                 TextColumn("[cyan]{task.fields[eta]}"), TextColumn("{task.fields[terms]}"),
                                 console=console, disable=not self.live)
        self.progress.start()
        self.task = self.progress.add_task(f"{trainer.cfg.method.name}/{trainer.cfg.model.name}",
                                           total=trainer.state.total_iters, completed=trainer.state.iteration, rate="", eta="",
                                           terms="")

    def after_step(self, trainer):
        self.progress.update(self.task, completed=trainer.state.iteration)

    def on_event(self, trainer, event):
        if "val" in event:
            val = event["val"]
            if self.lines and trainer.state.final is None:
                self.write(progress_line(trainer, "eval", evaluation_text(val, val["images"])))
        elif "loss" in event:
            if self.lines:
                self.write(progress_line(trainer, "iter", training_text(trainer, event)))
            terms = " ".join(f"{k}={event[k]:.4f}" for k in [*trainer.state.terms, *trainer.state.own_terms])
            self.progress.update(self.task, terms=f"{terms} lr={event['lr']:.2e}", eta=eta_text(eta_s(trainer.state)),
                                 rate=f"{1 / max(event['iter_s'], 1e-9):.2f} it/s")

    def after_final_evaluation(self, trainer):
        final = trainer.state.final
        if self.lines and final is not None:
            scores = {**final.metrics["student"], **{k: v for k, v in final.metrics.items() if k != "student"}}
            self.write(progress_line(trainer, "final eval", evaluation_text(scores, final.images)))

    def after_train(self, trainer):
        self.progress.stop()

    @staticmethod
    def write(line: str) -> None:
        console.print(line, markup=False, highlight=False)


@HOOKS.register("checkpoint")
class CheckpointHook(HookBase):
    """`checkpoints/last.pt`; with `train.keep_checkpoints_every` also a copy `iter_<k>.pt` kept at
    every multiple k (to measure along training, e.g. `sdesbench balance`)."""

    priority = Priority.LOW  # after the periodic evaluation: a checkpoint holds its iteration's evaluation

    def after_step(self, trainer):
        if trainer.state.at_interval(trainer.cfg.train.checkpoint_every):
            keep = trainer.cfg.train.keep_checkpoints_every
            trainer.save_checkpoint(keep_copy=bool(keep) and trainer.state.iteration % keep == 0)

    def after_train(self, trainer):
        # not after a failure: the last good checkpoint stays (and under DDP a lost rank cannot join its save)
        if trainer.state.stop_signal is not None and not trainer.state.failed \
                and trainer.state.last_checkpoint_iter != trainer.state.iteration:
            trainer.save_checkpoint()


def evaluation_entry(trainer: TrainerView, metrics: dict[str, dict[str, Any]], images: int) -> Evaluation:
    student = metrics["student"]
    return Evaluation(trainer.state.iteration, images, student["miou"], student["pixel_acc"],
                      dict(zip(trainer.class_names, student["per_class_iou"])),
                      {k: Scores.of(v) for k, v in metrics.items() if k != "student"}, student.get("macc"))


@HOOKS.register("periodic_evaluation")
class PeriodicEvaluationHook(HookBase):
    """With `eval.every`: the student (and e.g. Ens-T) evaluated every `eval.every` iterations and at
    the last one, on the first `eval.every_max_images` images of the evaluation set, appended to
    `trainer.state.history` and published as a "val" event (log.jsonl, TensorBoard).

    It leaves the training exactly as it was: the random-number state is restored after each
    evaluation (its data loader draws a seed from it) and so is every module's train/eval mode. At
    the last iteration, when its images are the final evaluation's (`final_images`), it takes the final
    evaluation's numbers in `after_final_evaluation` rather than evaluating twice; otherwise it evaluates
    its own images there after the step, as at any other iteration. Its priority is above
    `CheckpointHook`'s so that a checkpoint written at an evaluated iteration holds that evaluation (resume
    keeps the history)."""

    priority = Priority.NORMAL

    def images(self, trainer: TrainerView) -> int:
        limits = [len(trainer.eval_set), trainer.cfg.eval.max_images, trainer.cfg.eval.every_max_images]
        return min(n for n in limits if n is not None)

    def reuses_final(self, trainer: TrainerView) -> bool:
        """At the last iteration, the final evaluation scores this hook's images: its numbers are reused."""
        state = trainer.state
        return state.iteration >= state.total_iters and self.images(trainer) == final_images(trainer)

    def due(self, trainer: TrainerView) -> bool:
        state, every = trainer.state, trainer.cfg.eval.every
        evaluated = state.history and state.history[-1].iteration == state.iteration
        return bool(every) and (state.iteration % every == 0 or state.iteration >= state.total_iters) \
            and not evaluated

    def before_train(self, trainer):
        # a run resumed from a checkpoint whose own evaluation a signal cut short evaluates it now
        if trainer.state.start_iter and self.due(trainer) and not self.reuses_final(trainer):
            self.evaluate(trainer)

    def after_step(self, trainer):
        if self.due(trainer) and not self.reuses_final(trainer):
            self.evaluate(trainer)

    def after_final_evaluation(self, trainer):
        final = trainer.state.final
        if final is not None and self.due(trainer) and self.reuses_final(trainer):
            self.add(trainer, evaluation_entry(trainer, final.metrics, final.images))

    def evaluate(self, trainer: TrainerView) -> None:
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

    def add(self, trainer: TrainerView, entry: Evaluation) -> None:
        trainer.state.history.append(entry)
        if trainer.cfg.train.keep_best and best_evaluation(trainer.state.history) is entry:  # the record's `best`
            trainer.save_best()
        val: dict[str, Any] = {"images": entry.images, "miou": entry.miou, "pixel_acc": entry.pixel_acc,
                               "per_class_iou": entry.per_class_iou}
        val.update({k: {"miou": v.miou, "pixel_acc": v.pixel_acc} for k, v in entry.extra.items()})
        trainer.publish({"iter": entry.iteration, "val": val})


def final_view(trainer: TrainerView) -> EvalView:
    """The images the final evaluation scores: the first `eval.max_images` of the evaluation set."""
    return EvalView(trainer.eval_set, trainer.cfg.eval.max_images)


def final_images(trainer: TrainerView) -> int:
    return len(final_view(trainer))


def final_evaluation(trainer: TrainerView) -> FinalEvaluation | None:
    """The evaluation of the finished schedule (the table metric), with the per-image counts a bootstrap
    needs; None when a signal stopped it (the run is then recorded as interrupted, and `--resume` runs only
    the evaluation again)."""
    D.broadcast_state(trainer.learner.plain_unit)  # rank 0's BatchNorm statistics on every rank
    view = final_view(trainer)
    metrics = run_evaluation(trainer, view, show_progress=trainer.show_progress, per_image=True)
    return FinalEvaluation(metrics, len(view)) if metrics is not None else None


def run_evaluation(trainer: TrainerView, view: EvalView, **extra: Any) -> Any:
    """`evaluate` of the run's model on `view` as its config asks (batch size, precision, eval scale or
    size, sliding windows, test-time augmentation, the absent-class convention, loader workers), timed into
    `trainer.state.timings.eval_s`; it stops early when a signal stops the run (None then)."""
    learner, cfg = trainer.learner, trainer.cfg
    t0 = time.perf_counter()
    try:
        return evaluate(learner.model, view, trainer.num_classes, learner.runtime.device, cfg.eval.batch_size,
                        method=learner.method, amp=learner.runtime.amp,
                        should_stop=lambda: trainer.state.stop_signal is not None, inference=Inference.of(cfg.eval),
                        absent=cfg.eval.absent_classes, workers=cfg.eval.loader_workers(cfg.data), **extra)
    finally:
        trainer.state.timings.eval_s += time.perf_counter() - t0


def make_hooks(entries: list[Any]) -> list[HookBase]:
    """Every run's built-in hooks, then those of `train.hooks` (resolved by `configure.build_config`), each
    built from its registered class, with its `Options` when it declares some."""
    hooks: list[HookBase] = [HOOKS.get(name)() for name in BUILT_IN_HOOKS]
    for i, entry in enumerate(entries):
        name, options = hook_entry(entry, f"train.hooks[{i}]")
        cls = HOOKS.get(name)
        resolved = hook_options(cls, name, options)
        hooks.append(cls(from_dict(cls.Options, resolved)) if getattr(cls, "Options", None) is not None else cls())
    return hooks
