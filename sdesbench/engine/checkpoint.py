"""A training run's checkpoints: what they hold, writing them, and continuing a run from one.

Files, under the run's folder (`output.dir`):
    checkpoints/last.pt      what `--resume` continues from: written every `train.checkpoint_every` iterations,
                             at the end, and when a signal stops the run (engine/hooks.py, `CheckpointHook`)
    checkpoints/iter_<k>.pt  copies kept every `train.keep_checkpoints_every` iterations (off by default)
    checkpoints/best.pt      with `train.keep_best`: the state at the best periodic evaluation (the record's
                             `best`); never resumed from, its `iteration` is the evaluation's

Each holds the student, the method's modules (buffers such as memory queues included) and, for a method
that updates parameters of its own, its optimizer; the student's optimizer, the LR scheduler, the AMP
scaler; the global random-number state (CPU and CUDA) and the method's generator of every rank; the
iteration; the configuration and its hash (a checkpoint continues only the configuration that wrote it);
the times summed over the sessions so far; the periodic evaluations (`history`); each hook's state by its
`state_key`; and the training split's class pixel counts when the method asked for them
(engine/restore.py, `CLASS_COUNTS_KEY`). That is everything a resumed run needs to go on bitwise as if
it had never stopped (on a CPU; `tests/test_hook_contract.py`, `tests/test_reliability.py`).

`engine/restore.py` is where a network alone comes back from a checkpoint (a teacher, `eval`, `show`);
this module is the Trainer's side: the whole training state.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from sdesbench.config import RunConfig
from sdesbench.engine import distributed as D
from sdesbench.engine.record import Evaluation, Timings
from sdesbench.engine.restore import CLASS_COUNTS_KEY
from sdesbench.engine.step import Learner
from sdesbench.errors import CheckpointError, SdesbenchError
from sdesbench.io import load_checkpoint, save_checkpoint
from sdesbench.models import count_params
from sdesbench.validate import from_dict


@dataclass
class Progress:
    """What a checkpoint carries besides the modules' and optimizers' states: how far the run is, and the
    times of its sessions so far."""

    iteration: int
    step_time_s: float  # the steps alone
    wall_s: float  # the real wall time (record.RunRecord.wall_time_s)
    timings: Timings  # where the wall time went (record.Timings)
    history: list[Evaluation] = field(default_factory=list)  # periodic evaluations
    hooks: dict[str, dict[str, Any]] = field(default_factory=dict)  # each hook's state, by its `state_key`
    timed: bool = True  # False: written before the record's schema 4, which carried no times (they count as 0)


class Checkpoints:
    """The checkpoint files of the run in `out` (module docstring)."""

    def __init__(self, out: Path):
        self.last = out / "checkpoints" / "last.pt"
        self.best = self.last.with_name("best.pt")

    def copy(self, iteration: int) -> Path:
        return self.last.with_name(f"iter_{iteration}.pt")

    def write(self, paths: list[Path], cfg: RunConfig, num_classes: int, learner: Learner, scheduler: LRScheduler,
              progress: Progress, class_counts: torch.Tensor | None) -> None:
        """The training state into each of `paths` (rank 0 writes; every rank gives its generator's state)."""
        generators = D.all_objects(learner.method.generator.get_state())  # every rank's, in rank order
        if D.is_main():
            state = {**training_state(cfg, num_classes, learner, scheduler, progress, class_counts),
                     "method_generators": generators}
            for path in paths:
                save_checkpoint(path, state)
        D.barrier()

    def restore(self, cfg: RunConfig, learner: Learner, scheduler: LRScheduler) -> Progress:
        """Load `last.pt` into the learner, the scheduler and the random-number state; how far it was."""
        return restore_training_state(load_checkpoint(self.last, map_location="cpu"), self.last, cfg, learner,
                                      scheduler)


def training_state(cfg: RunConfig, num_classes: int, learner: Learner, scheduler: LRScheduler, progress: Progress,
                   class_counts: torch.Tensor | None) -> dict[str, Any]:
    return {
        "iteration": progress.iteration,
        "model_name": cfg.model.name,
        "num_classes": num_classes,
        "config": cfg.to_dict(),
        "config_hash": cfg.identity_hash(),
        "model": learner.model.state_dict(),
        "method": learner.method.state_dict(),
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": learner.scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "elapsed": progress.step_time_s,  # the key older checkpoints have
        "wall_s": progress.wall_s,
        "timings": dataclasses.asdict(progress.timings),
        "history": [dataclasses.asdict(e) for e in progress.history],
        "hooks": progress.hooks,
        **({"method_optimizer": learner.method_optimizer.state_dict()} if learner.method_optimizer else {}),
        **({CLASS_COUNTS_KEY: class_counts} if class_counts is not None else {}),
    }


def restore_training_state(state: dict[str, Any], path: Path, cfg: RunConfig, learner: Learner,
                           scheduler: LRScheduler) -> Progress:
    if state.get("config_hash") != cfg.identity_hash():
        raise CheckpointError(f"{path} was written by a different configuration; "
                              "resume with the same settings or use another --out")
    learner.model.load_state_dict(state["model"])
    learner.method.load_state_dict(state["method"])
    learner.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    learner.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    if learner.method_optimizer is not None:
        learner.method_optimizer.load_state_dict(state["method_optimizer"])
    generators = state.get("method_generators", [])  # absent before methods had a generator
    if D.rank() < len(generators):  # this rank's; a rank the checkpoint did not have starts from its seed
        learner.method.generator.set_state(generators[D.rank()])
    # a checkpoint written before the record's schema 4 carries no times: its sessions count as 0 s
    return Progress(iteration=int(state["iteration"]), step_time_s=float(state["elapsed"]),
                    wall_s=float(state.get("wall_s", 0.0)),
                    timings=from_dict(Timings, state.get("timings", {}), "checkpoint timings"),
                    history=[from_dict(Evaluation, e, "checkpoint history") for e in state.get("history", [])],
                    hooks=dict(state.get("hooks", {})), timed="timings" in state)


def check_free_space(out: Path, learner: Learner, optimizer: str) -> None:
    """Fail before training when the output disk cannot hold a checkpoint (weights + optimizer state)."""
    unit = learner.plain_unit
    n = count_params(unit)
    buffers = sum(b.numel() * b.element_size() for b in unit.buffers())  # e.g. CIRKD's memory queues
    # fp32 weights + momentum (AdamW: two moments) + the buffers, twice during the atomic write, + margin
    states = 2 if optimizer == "adamw" else 1
    need = 2 * ((1 + states) * 4 * n + buffers) + 64 * 2**20
    free = shutil.disk_usage(out).free
    if free < need:
        raise SdesbenchError(f"output folder {out} has {free / 2**20:.0f} MiB free; a checkpoint needs about "
                             f"{need / 2**20:.0f} MiB")

