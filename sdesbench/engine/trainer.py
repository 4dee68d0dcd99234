"""The one Trainer used by every method.

Iteration-based SGD (or AdamW, `train.optimizer`) with poly decay (torch's PolynomialLR, stepped every iteration), a seeded and
resumable data stream, and `step.train_step` for every iteration; once the schedule is complete, the final
evaluation (the table's metric), which hooks then observe. Checkpoints, the log, the progress bar, signal
handling and the periodic evaluation are hooks (`engine/hooks.py`; what they see: `state.TrainerView`). Each run
ends with one atomic results record (`engine/record.py`), whose times the Trainer measures: the
real wall time, the steps' own, and where the rest went (`record.Timings`), summed over resumes
through the checkpoint.

Output folder layout (`output.dir`):
    config.yaml          the full resolved configuration
    checkpoints/         last.pt (what --resume continues), iter_<k>.pt, best.pt (engine/checkpoint.py)
    log.jsonl            loss terms, lr, images/s, s/iter, loader wait, peak memory every `train.log_every`
                         iterations; periodic evaluations (`output.loggers`: engine/loggers.py)
    tensorboard/         the same scalars as TensorBoard event files
    mlruns/, wandb/      the same scalars, configuration and final metrics for MLflow and W&B, when asked for
    loggers.json         MLflow's and W&B's run ids, for a resumed run
    results.json         the results record (status completed | failed | interrupted), with `history`
    image_counts.npz     per-image TP/FP/FN counts of the final evaluation (engine/record.py)

Whether a run may start in a folder that already holds one, what it continues and what it brings back:
engine/run_folder.py.
"""
from __future__ import annotations

import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.optim.lr_scheduler import PolynomialLR
from torch.utils.data import DataLoader

from sdesbench.config import RunConfig
from sdesbench.data.base import IterationSampler, TrainView, build_dataset, class_pixel_counts
from sdesbench.data.check import ensure_checked
from sdesbench.engine import distributed as D
from sdesbench.engine import step
from sdesbench.engine.checkpoint import Checkpoints, Progress, check_free_space
from sdesbench.engine.hooks import final_evaluation, make_hooks
from sdesbench.engine.record import (ImageCounts, RunRecord, Scores, Timings, best_of, cost_of, write_image_counts,
                                     write_record)
from sdesbench.engine.run_folder import Resume, RunFolder
from sdesbench.engine.runtime import (RunLock, Runtime, peak_memory_mb, provenance, reset_peak_memory,
                                      set_determinism)
from sdesbench.engine.state import HookBase, Hooks, TrainerView, TrainState
from sdesbench.errors import Interrupted, NumericalFault, SdesbenchError, StorageError
from sdesbench.io import check_writable, write_text
from sdesbench.methods.base import StepInfo
from sdesbench.models import count_params


class Trainer:
    def __init__(self, cfg: RunConfig, resume: Resume | bool = "never", show_progress: bool = True):
        self.cfg = cfg
        self.resume: Resume = {True: "required", False: "never"}.get(resume, resume)  # type: ignore[arg-type]
        if self.resume == "never" and D.restart_count() > 0:  # torchrun restarted the group: continue (run_folder.py)
            self.resume = "restart"
        self.show_progress = show_progress and D.is_main()
        self.out = Path(cfg.output.dir)
        self.checkpoints = Checkpoints(self.out)
        self.folder = RunFolder(self.out, self.checkpoints.last, self.resume)
        self.state = TrainState(total_iters=cfg.train.iters)  # what the loop and the hooks share
        self.step_time_s = 0.0  # the steps alone, summed over resumes
        # the sessions before this one (from the checkpoint): how far they went, and their times; this one's
        # are `state.timings`
        self.before = Progress(iteration=0, step_time_s=0.0, wall_s=0.0, timings=Timings())
        self.started = time.perf_counter()  # reset when `run` starts
        self.hooks = Hooks([])
        self._view: TrainerView | None = None  # what the hooks see, once set up
        self.class_counts: torch.Tensor | None = None  # the training split's, once a method asked for them

    # ------------------------------------------------------------------ setup
    @property
    def cache_dir(self) -> Path:
        env = os.environ.get("SDESBENCH_CACHE")
        return Path(env) if env else self.out / "cache"

    def setup(self) -> None:
        cfg = self.cfg
        set_determinism(cfg.train.deterministic)
        runtime = Runtime.create(cfg.train.device, cfg.train.amp, cfg.train.channels_last)
        reset_peak_memory(runtime.device)  # this run's peak, not the largest of the runs before it in this process
        torch.manual_seed(cfg.train.seed)
        self.train_set = build_dataset(cfg.data.name, cfg.data.root, cfg.data.train_split)
        self.eval_set = build_dataset(cfg.data.name, cfg.data.root, cfg.data.eval_split)
        if cfg.data.check:
            t0 = time.perf_counter()
            ensure_checked(self.train_set, self.eval_set, self.cache_dir)
            self.state.timings.data_check_s += time.perf_counter() - t0
        self.num_classes = self.train_set.num_classes
        self.class_names = list(self.train_set.class_names)

        def teacher() -> Any:
            return step.load_teacher(cfg.teacher.model, cfg.teacher.checkpoint, cfg.method.name, self.num_classes,
                                     runtime.device)

        self.learner = step.build_learner(cfg.model, cfg.method.name, cfg.method.options, self.num_classes, runtime,
                                          cfg.train, self._class_counts, teacher)
        self.student_params = count_params(self.learner.model)
        self.scheduler = PolynomialLR(self.learner.optimizer, total_iters=cfg.train.iters, power=cfg.train.poly_power)
        check_free_space(self.out, self.learner, cfg.train.optimizer)

    def _class_counts(self) -> torch.Tensor:
        """The training split's per-class pixel counts (SDES's class split), kept for the checkpoint so
        that the run can be restored without its training set (engine/restore.py)."""
        if self.class_counts is None:
            self.class_counts = class_pixel_counts(self.train_set, self.cache_dir)
        return self.class_counts

    def build_hooks(self) -> list[HookBase]:
        """The built-in hooks and those of `train.hooks`; each declares its priority (engine/hooks.py has the
        table of who runs when)."""
        return make_hooks(self.cfg.train.hooks)

    def view(self) -> TrainerView:
        """What the hooks see of this Trainer (engine/state.py), once it is set up."""
        return TrainerView(state=self.state, cfg=self.cfg, out=self.out, learner=self.learner, eval_set=self.eval_set,
                           class_names=self.class_names, num_classes=self.num_classes,
                           show_progress=self.show_progress, save_checkpoint=self.save_checkpoint,
                           save_best=self.save_best, publish=self.publish)

    def publish(self, event: dict[str, Any]) -> None:
        """Hand a measurement (training scalars, an evaluation) to every hook's `on_event`."""
        self.hooks.on_event(self._view, event)

    # ------------------------------------------------------------------ checkpoints (engine/checkpoint.py)
    def save_checkpoint(self, keep_copy: bool = False) -> None:
        """`checkpoints/last.pt` (and `iter_<k>.pt` with `keep_copy`)."""
        self._write_checkpoints([self.checkpoints.last] + ([self.checkpoints.copy(self.state.iteration)]
                                                           if keep_copy else []))
        self.state.last_checkpoint_iter = self.state.iteration

    def save_best(self) -> None:
        """`checkpoints/best.pt` (`train.keep_best`): the state at the best periodic evaluation so far."""
        self._write_checkpoints([self.checkpoints.best])

    def _write_checkpoints(self, paths: list[Path]) -> None:
        t0 = time.perf_counter()
        progress = Progress(self.state.iteration, self.step_time_s, self.wall_time_s, self.total_timings,
                            self.state.history, self.hooks.state_dict())
        self.checkpoints.write(paths, self.cfg, self.num_classes, self.learner, self.scheduler, progress,
                               self.class_counts)
        self.state.timings.checkpoint_s += time.perf_counter() - t0

    def _restore(self) -> None:
        self.before = before = self.checkpoints.restore(self.cfg, self.learner, self.scheduler)
        self.state.start_iter = self.state.iteration = self.state.last_checkpoint_iter = before.iteration
        self.step_time_s = before.step_time_s
        self.state.history = list(before.history)

    # ------------------------------------------------------------------ time
    @property
    def wall_time_s(self) -> float:
        """The run's wall time so far, summed over its sessions (as of their last checkpoint: the work
        a killed session did after it is redone, and its time is not counted)."""
        return self.before.wall_s + time.perf_counter() - self.started

    @property
    def total_timings(self) -> Timings:
        return self.before.timings.plus(self.state.timings)

    # ------------------------------------------------------------------ record
    def _record(self, status: str, error: str | None = None) -> RunRecord:
        cfg, learner = self.cfg, self.learner
        wall, timings = self.wall_time_s, self.total_timings
        untimed = 0 if self.before.timed else self.before.iteration  # sessions whose times are unknown
        record = RunRecord(
            status=status, error=error, config=cfg.to_dict(), config_hash=cfg.identity_hash(),
            model=cfg.model.name, method=cfg.method.name, dataset=cfg.data.name, seed=cfg.train.seed,
            iterations=self.state.iteration, num_classes=self.num_classes, class_names=self.class_names,
            params=self.student_params, params_m=round(self.student_params / 1e6, 4),
            pretrained=bool(getattr(learner.model, "pretrained", False)), wall_time_s=round(wall, 3),
            step_time_s=round(self.step_time_s, 3), timings=timings.rounded(),
            iters_per_s=round((self.state.iteration - untimed) / timings.train_s, 4) if timings.train_s > 0 else None,
            peak_memory_mb=round(peak_memory_mb(learner.runtime.device), 1), device=learner.runtime.device_name,
            world_size=D.world_size(), amp=learner.runtime.amp_name, history=list(self.state.history),
            best=best_of(self.state.history), **provenance())
        record.cost = cost_of(record)  # device-hours and images trained on, from the fields above (engine/cost.py)
        final = self.state.final
        if status == "completed" and final is not None:
            student = final.metrics["student"]
            record.metrics = Scores.of(student)
            record.per_class_iou = dict(zip(self.class_names, student["per_class_iou"]))
            record.extra_metrics = {k: Scores.of(v) for k, v in final.metrics.items() if k != "student"}
            if D.is_main():
                counts = {k: v["image_counts"].numpy() for k, v in final.metrics.items()}
                record.image_counts = write_image_counts(self.out, ImageCounts(self.image_ids(), counts))
        if D.is_main():
            write_record(self.out, record)
        return record

    def image_ids(self) -> list[str]:
        """Names of the final evaluation's images, relative to the dataset folder (comparable across
        machines): which images two runs share."""
        root = getattr(self.eval_set, "root", None)
        ids = [self.eval_set.sample_id(i) for i in range(self.state.final.images)]
        return [os.path.relpath(i, root) if root and os.path.isabs(i) else i for i in ids]

    # ------------------------------------------------------------------ loop
    def run(self) -> RunRecord:
        self.started = time.perf_counter()
        check_writable(self.out)
        # under torchrun the ranks share the folder: rank 0 holds the lock and writes the files
        with RunLock(self.out) if D.is_main() else nullcontext():
            try:
                return self._run_locked()
            except RuntimeError as e:  # a rank lost before the loop (setup's collectives): one line, nothing recorded
                fault = D.collective_fault(e, self.state.iteration, self.cfg.train.dist_timeout_s)
                if fault is None:
                    raise
                raise fault from None

    def _run_locked(self) -> RunRecord:
        self.folder.check(self.cfg.identity_hash())
        self.setup()
        if self.folder.resumes:
            self._restore()
        self.folder.set_previous_aside()
        if D.is_main():
            write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.state.timings.setup_s = time.perf_counter() - self.started - self.state.timings.data_check_s
        self.hooks = hooks = Hooks(self.build_hooks())
        hooks.load_state_dict(self.before.hooks)  # a resumed run: each hook continues from its checkpointed state
        self._view = view = self.view()
        try:
            hooks.before_train(view)
            self._loop(hooks, view)
            if self.state.schedule_complete:
                self.state.final = final_evaluation(view)  # None: a signal stopped it
                if self.state.final is not None:
                    hooks.after_final_evaluation(view)
        except NumericalFault as e:
            self.state.failed = True
            error: SdesbenchError | None = e
        except StorageError as e:  # disk full while writing a checkpoint or the log
            self.state.failed = True
            error = e
        except RuntimeError as e:  # under torchrun, another rank died or hangs: a collective failed
            fault = D.collective_fault(e, self.state.iteration, self.cfg.train.dist_timeout_s)
            if fault is None:
                raise
            self.state.failed = True
            error = type(fault)(f"{fault}; {self._kept()}")  # its kind kept (PeerLost: engine/elastic.py)
        else:
            error = None
        finally:
            hooks.after_train(view)
        if error is not None:
            try:
                self._record("failed", error=str(error))
            except StorageError as e:  # the disk that stopped the run cannot take its record either
                raise StorageError(f"{error}; the run's record could not be written either ({e})") from None
            raise error
        if self.state.stop_signal is not None:
            self._record("interrupted")
            name = signal.Signals(self.state.stop_signal).name
            raise Interrupted(f"{name}: stopped at iteration {self.state.iteration}, checkpoint saved in {self.checkpoints.last}; "
                              "continue with --resume", self.state.stop_signal)
        record = self._record("completed")
        self.folder.compare_with_previous(record)
        return record

    def _loader(self) -> DataLoader:
        cfg = self.cfg
        view = TrainView(self.train_set, cfg.data.crop, cfg.data.scale, cfg.data.flip)
        sampler = IterationSampler(len(view), cfg.data.batch_size, cfg.train.iters, cfg.train.seed,
                                   start_iter=self.state.start_iter, rank=D.rank(), world_size=D.world_size())
        cuda = self.learner.runtime.device.type == "cuda"
        workers = cfg.data.workers
        return DataLoader(view, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=workers,
                          pin_memory=cuda, persistent_workers=cuda and workers > 0, drop_last=False,
                          prefetch_factor=4 if workers > 0 else None,
                          generator=torch.Generator())  # keeps the global RNG untouched (exact resume)

    def _guard(self, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        """Stop before a non-finite loss reaches the weights; every rank stops together."""
        if D.all_true(bool(torch.isfinite(loss)), self.learner.runtime.device):
            return
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v))] or ["total"]
        raise NumericalFault(f"non-finite loss term '{bad[0]}' at iteration {self.state.iteration + 1}; "
                             f"{self._kept('good ')}")

    def _kept(self, good: str = "") -> str:
        """What a failed run leaves to continue from."""
        if self.state.last_checkpoint_iter is None:
            return "no checkpoint had been written yet"
        return f"the last {good}checkpoint is kept (iteration {self.state.last_checkpoint_iter})"

    def _loop(self, hooks: Hooks, view: TrainerView) -> None:
        if self.state.iteration >= self.state.total_iters:
            return
        self.learner.unit.train()
        ready = time.perf_counter()  # the loader's start (its workers) counts as the first batch's wait
        for images, labels in self._loader():
            t0 = time.perf_counter()
            self.state.terms = step.train_step(self.learner, images, labels,
                                               StepInfo(self.state.iteration, self.state.total_iters), guard=self._guard)
            self.state.own_terms = self.learner.own_terms
            self.scheduler.step()
            self.state.iteration += 1
            t1 = time.perf_counter()
            self.state.last_data_s, self.state.last_step_s = t0 - ready, t1 - t0
            self.step_time_s += self.state.last_step_s
            self.state.timings.train_s += t1 - ready
            hooks.after_step(view)  # evaluations and checkpoints in here are timed apart
            if self.state.stop_signal is not None:
                break
            ready = time.perf_counter()


def train(cfg: RunConfig, resume: Resume | bool = "never", show_progress: bool = True) -> RunRecord:
    return Trainer(cfg, resume=resume, show_progress=show_progress).run()
