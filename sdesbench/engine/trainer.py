"""The one Trainer used by every method.

Iteration-based SGD with poly decay (torch's PolynomialLR, stepped every iteration), a seeded and
resumable data stream, and `step.train_step` for every iteration; checkpoints, the log, the
progress bar, signal handling and the final evaluation are hooks (`engine/hooks.py`). Each run
ends with one atomic results record (`engine/record.py`).

Output folder layout (`output.dir`):
    config.yaml          the full resolved configuration
    checkpoints/last.pt  model, method modules, optimizer, scheduler, RNG, iteration
    checkpoints/iter_<k>.pt  copies kept every `train.keep_checkpoints_every` iterations (off by default)
    log.jsonl            loss terms, lr and images/s every `train.log_every` iterations; periodic evaluations
    tensorboard/         the same scalars as TensorBoard event files (`output.tensorboard`)
    results.json         the results record (status completed | failed | interrupted), with `history`
    image_counts.npz     per-image TP/FP/FN counts of the final evaluation (engine/record.py)

Starting a run in a folder that already holds one: a completed run is never overwritten; a
checkpoint (an interrupted, failed or killed run) is continued only with `resume` ("required" from
`sdesbench train --resume`, "auto" from `sdesbench run`), never silently retrained from zero;
`--resume` into a folder without a checkpoint says there is nothing to resume.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch.optim.lr_scheduler import PolynomialLR
from torch.utils.data import DataLoader

from sdesbench.config import RunConfig, from_dict
from sdesbench.data.base import IterationSampler, TrainView, build_dataset, class_pixel_counts
from sdesbench.data.check import ensure_checked
from sdesbench.engine import distributed as D
from sdesbench.engine import step
from sdesbench.engine.hooks import (CheckpointHook, FinalEvaluationHook, HookBase, LogHook, PeriodicEvaluationHook,
                                    ProgressHook, SignalHook, TensorBoardHook, run_hooks)
from sdesbench.engine.record import (Evaluation, ImageCounts, RunRecord, Scores, best_of, read_record,
                                     write_image_counts, write_record)
from sdesbench.engine.runtime import RunLock, Runtime, peak_memory_mb, provenance, set_determinism
from sdesbench.errors import CheckpointError, Interrupted, NumericalFault, SdesbenchError, StorageError
from sdesbench.io import check_writable, load_checkpoint, save_checkpoint, write_text
from sdesbench.methods.base import StepInfo
from sdesbench.models import count_params

Resume = Literal["never", "auto", "required"]


class Trainer:
    def __init__(self, cfg: RunConfig, resume: Resume | bool = "never", show_progress: bool = True):
        self.cfg = cfg
        self.resume: Resume = {True: "required", False: "never"}.get(resume, resume)  # type: ignore[arg-type]
        self.show_progress = show_progress and D.is_main()
        self.out = Path(cfg.output.dir)
        self.ckpt_path = self.out / "checkpoints" / "last.pt"
        # state the hooks read and write
        self.total_iters = cfg.train.iters
        self.start_iter = 0
        self.iteration = 0
        self.terms: dict[str, torch.Tensor] = {}
        self.last_step_s = 0.0
        self.elapsed = 0.0  # training seconds, summed over resumes
        self.stop_signal: int | None = None
        self.failed = False
        self.last_checkpoint_iter: int | None = None
        self.final_metrics: dict[str, dict[str, Any]] | None = None
        self.final_images = 0
        self.history: list[Evaluation] = []  # periodic evaluations (eval.every)
        self.hooks: list[HookBase] = []

    # ------------------------------------------------------------------ setup
    @property
    def cache_dir(self) -> Path:
        env = os.environ.get("SDESBENCH_CACHE")
        return Path(env) if env else self.out / "cache"

    def setup(self) -> None:
        cfg = self.cfg
        set_determinism(cfg.train.deterministic)
        runtime = Runtime.create(cfg.train.device, cfg.train.amp, cfg.train.channels_last)
        torch.manual_seed(cfg.train.seed)
        self.train_set = build_dataset(cfg.data.name, cfg.data.root, cfg.data.train_split)
        self.eval_set = build_dataset(cfg.data.name, cfg.data.root, cfg.data.eval_split)
        if cfg.data.check:
            ensure_checked(self.train_set, self.eval_set, self.cache_dir)
        self.num_classes = self.train_set.num_classes
        self.class_names = list(self.train_set.class_names)

        def teacher() -> Any:
            return step.load_teacher(cfg.teacher.model, cfg.teacher.checkpoint, cfg.method.name, self.num_classes,
                                     runtime.device)

        self.learner = step.build_learner(cfg.model, cfg.method.name, cfg.method.options, self.num_classes, runtime,
                                          cfg.train, lambda: class_pixel_counts(self.train_set, self.cache_dir),
                                          teacher)
        self.student_params = count_params(self.learner.model)
        self.scheduler = PolynomialLR(self.learner.optimizer, total_iters=cfg.train.iters, power=cfg.train.poly_power)
        self._check_free_space()

    def _check_free_space(self) -> None:
        """Fail before training when the output disk cannot hold a checkpoint (weights + optimizer state)."""
        n = count_params(self.learner.plain_unit)
        need = 3 * 4 * n + 64 * 2**20  # fp32 weights + momentum + temporary copy during the atomic write, + margin
        free = shutil.disk_usage(self.out).free
        if free < need:
            raise SdesbenchError(f"output folder {self.out} has {free / 2**20:.0f} MiB free; a checkpoint needs about "
                                 f"{need / 2**20:.0f} MiB")

    def build_hooks(self) -> list[HookBase]:
        # the order matters (engine/hooks.py): writers before the hooks that publish, the periodic
        # evaluation before the checkpoint and before the final evaluation it may reuse
        return [SignalHook(), LogHook(), TensorBoardHook(), ProgressHook(self.show_progress),
                PeriodicEvaluationHook(self.cfg.eval.every), CheckpointHook(), FinalEvaluationHook(self.show_progress)]

    def publish(self, event: dict[str, Any]) -> None:
        """Hand a measurement (training scalars, an evaluation) to every hook's `on_event`."""
        for hook in self.hooks:
            hook.on_event(self, event)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        learner = self.learner
        return {
            "iteration": self.iteration,
            "model_name": self.cfg.model.name,
            "num_classes": self.num_classes,
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.identity_hash(),
            "model": learner.model.state_dict(),
            "method": learner.method.state_dict(),
            "optimizer": learner.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": learner.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "elapsed": self.elapsed,
            "history": [dataclasses.asdict(e) for e in self.history],
        }

    def save_checkpoint(self, keep_copy: bool = False) -> None:
        """`checkpoints/last.pt` (and `iter_<k>.pt` with `keep_copy`)."""
        if D.is_main():
            state = self._state()
            save_checkpoint(self.ckpt_path, state)
            if keep_copy:
                save_checkpoint(self.ckpt_path.with_name(f"iter_{self.iteration}.pt"), state)
        D.barrier()
        self.last_checkpoint_iter = self.iteration

    def _restore(self) -> None:
        state = load_checkpoint(self.ckpt_path, map_location="cpu")
        if state.get("config_hash") != self.cfg.identity_hash():
            raise CheckpointError(f"{self.ckpt_path} was written by a different configuration; "
                                  "resume with the same settings or use another --out")
        learner = self.learner
        learner.model.load_state_dict(state["model"])
        learner.method.load_state_dict(state["method"])
        learner.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        learner.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.start_iter = self.iteration = self.last_checkpoint_iter = int(state["iteration"])
        self.elapsed = float(state["elapsed"])
        self.history = [from_dict(Evaluation, e, "checkpoint history") for e in state.get("history", [])]

    def _check_existing(self) -> None:
        """What the folder already holds decides whether this run may start (module docstring)."""
        try:
            previous = read_record(self.out)
        except StorageError:
            previous = None  # an unreadable record is replaced; the checkpoint rules below still apply
        if previous is not None and previous.completed and self.resume == "never":
            raise SdesbenchError(f"{self.out} already holds a completed run; choose another --out "
                                 "(nothing was overwritten)")
        has_ckpt = self.ckpt_path.is_file()
        if self.resume == "never" and has_ckpt:
            where = f"{previous.status} at iteration {previous.iterations}" if previous else "a checkpoint is there"
            raise SdesbenchError(f"{self.out}: {where}: add --resume to continue, or choose another --out "
                                 "(nothing was overwritten)")
        if self.resume == "required" and not has_ckpt:
            raise SdesbenchError(f"nothing to resume in {self.out} (no {self.ckpt_path.relative_to(self.out)}); "
                                 "run without --resume to start fresh")

    # ------------------------------------------------------------------ record
    def _record(self, status: str, error: str | None = None) -> RunRecord:
        cfg, learner = self.cfg, self.learner
        done = self.iteration - self.start_iter
        record = RunRecord(
            status=status, error=error, config=cfg.to_dict(), config_hash=cfg.identity_hash(),
            model=cfg.model.name, method=cfg.method.name, dataset=cfg.data.name, seed=cfg.train.seed,
            iterations=self.iteration, num_classes=self.num_classes, class_names=self.class_names,
            params=self.student_params, params_m=round(self.student_params / 1e6, 4),
            pretrained=bool(getattr(learner.model, "pretrained", False)), wall_time_s=round(self.elapsed, 3),
            iters_per_s=round(done / self.session_s, 4) if self.session_s > 0 and done > 0 else None,
            peak_memory_mb=round(peak_memory_mb(learner.runtime.device), 1), device=learner.runtime.device_name,
            world_size=D.world_size(), amp=learner.runtime.amp_name, history=list(self.history),
            best=best_of(self.history), **provenance())
        if status == "completed" and self.final_metrics is not None:
            student = self.final_metrics["student"]
            record.metrics = Scores(student["miou"], student["pixel_acc"])
            record.per_class_iou = dict(zip(self.class_names, student["per_class_iou"]))
            record.extra_metrics = {k: Scores(v["miou"], v["pixel_acc"])
                                    for k, v in self.final_metrics.items() if k != "student"}
            if D.is_main():
                counts = {k: v["image_counts"].numpy() for k, v in self.final_metrics.items()}
                record.image_counts = write_image_counts(self.out, ImageCounts(self.image_ids(), counts))
        if D.is_main():
            write_record(self.out, record)
        return record

    def image_ids(self) -> list[str]:
        """Names of the final evaluation's images, relative to the dataset folder (comparable across
        machines): which images two runs share."""
        root = getattr(self.eval_set, "root", None)
        ids = [self.eval_set.sample_id(i) for i in range(self.final_images)]
        return [os.path.relpath(i, root) if root and os.path.isabs(i) else i for i in ids]

    # ------------------------------------------------------------------ loop
    @property
    def lr(self) -> float:
        return self.learner.optimizer.param_groups[0]["lr"]

    def at_interval(self, every: int) -> bool:
        """Whether the iteration just finished is a multiple of `every`, or the last one."""
        return self.iteration % every == 0 or self.iteration == self.total_iters

    def run(self) -> RunRecord:
        check_writable(self.out)
        # under torchrun the ranks share the folder: rank 0 holds the lock and writes the files
        with RunLock(self.out) if D.is_main() else nullcontext():
            return self._run_locked()

    def _run_locked(self) -> RunRecord:
        self._check_existing()
        self.setup()
        if self.resume != "never" and self.ckpt_path.is_file():
            self._restore()
        if D.is_main():
            write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.session_s = 0.0
        self.hooks = hooks = self.build_hooks()
        try:
            run_hooks(hooks, "before_train", self)
            self._loop(hooks)
        except NumericalFault as e:
            self.failed = True
            error: SdesbenchError | None = e
        except StorageError as e:  # disk full while writing a checkpoint or the log
            self.failed = True
            error = e
        else:
            error = None
        finally:
            run_hooks(hooks, "after_train", self)
        if error is not None:
            try:
                self._record("failed", error=str(error))
            except StorageError as e:  # the disk that stopped the run cannot take its record either
                raise StorageError(f"{error}; the run's record could not be written either ({e})") from None
            raise error
        if self.stop_signal is not None:
            self._record("interrupted")
            name = signal.Signals(self.stop_signal).name
            raise Interrupted(f"{name}: stopped at iteration {self.iteration}, checkpoint saved in {self.ckpt_path}; "
                              "continue with --resume", self.stop_signal)
        return self._record("completed")

    def _loader(self) -> DataLoader:
        cfg = self.cfg
        view = TrainView(self.train_set, cfg.data.crop, cfg.data.scale, cfg.data.flip)
        sampler = IterationSampler(len(view), cfg.data.batch_size, cfg.train.iters, cfg.train.seed,
                                   start_iter=self.start_iter, rank=D.rank(), world_size=D.world_size())
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
        kept = (f"the last good checkpoint is kept (iteration {self.last_checkpoint_iter})"
                if self.last_checkpoint_iter is not None else "no checkpoint had been written yet")
        raise NumericalFault(f"non-finite loss term '{bad[0]}' at iteration {self.iteration + 1}; {kept}")

    def _loop(self, hooks: list[HookBase]) -> None:
        if self.iteration >= self.total_iters:
            return
        self.learner.unit.train()
        t_session = time.perf_counter()
        try:
            for images, labels in self._loader():
                t0 = time.perf_counter()
                self.terms = step.train_step(self.learner, images, labels, StepInfo(self.iteration, self.total_iters),
                                             guard=self._guard)
                self.scheduler.step()
                self.iteration += 1
                self.last_step_s = time.perf_counter() - t0
                self.elapsed += self.last_step_s
                run_hooks(hooks, "after_step", self)
                if self.stop_signal is not None:
                    break
        finally:
            self.session_s = time.perf_counter() - t_session


def train(cfg: RunConfig, resume: Resume | bool = "never", show_progress: bool = True) -> RunRecord:
    return Trainer(cfg, resume=resume, show_progress=show_progress).run()
