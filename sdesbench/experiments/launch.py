"""Launching a table's runs: here, one after another (`local`), or as Slurm jobs (`slurm`); several at
once here is `parallel.py` (`--gpus`, `--workers`).

Both launchers take the runs `plan.expand` made, skip the finished ones and train each distinct
run folder once, teachers before their students; a rerun continues every unfinished run from its
last checkpoint (`resume="auto"`).

`slurm`: one submitit job per run still to do. A student whose teacher is still to be trained gets
the Slurm dependency `afterok:<teacher job id>`, so it starts only once its teacher finished
successfully (and never if it failed). A job with `--slurm-gpus N > 1` runs N tasks on one node,
one per GPU; submitit's `TorchDistributedEnvironment` exports RANK/WORLD_SIZE/MASTER_ADDR, and
the Trainer runs DDP as under torchrun (`data.batch_size` is per GPU). On a time limit, submitit
signals the job and requeues it (the callable is checkpointable); the requeued job resumes from
the last checkpoint. submitit is an optional dependency (`pip install 'sdesbench[cluster]'`).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from sdesbench.config import parse_override
from sdesbench.console import err as console
from sdesbench.data.base import build_dataset
from sdesbench.engine import distributed as D
from sdesbench.engine.configure import build_config
from sdesbench.engine.record import RunRecord
from sdesbench.engine.trainer import train
from sdesbench.errors import ConfigError, Interrupted, RunLocked, SdesbenchError
from sdesbench.experiments.plan import PlannedRun, Sweep, dependency_finished
from sdesbench.io import check_writable

LAUNCHERS = ("local", "slurm")


def check_datasets(runs: Sequence[PlannedRun]) -> None:
    """Open every dataset split the runs to train read (folders and list files are scanned, no image is
    decoded): a missing folder, split or list file (Table 1 without its trainaug list) stops the sweep
    in one line before the first run, instead of failing each run in turn. Local launchers only: a
    Slurm job may see folders the submitting machine does not."""
    opened: set[tuple[str, str | None, str]] = set()
    for run in runs:
        data = run.cfg.data
        for split in (data.train_split, data.eval_split):
            if (data.name, data.root, split) not in opened:
                opened.add((data.name, data.root, split))
                build_dataset(data.name, data.root, split)


def pending_runs(plans: Sequence[PlannedRun], sweep: Sweep, open_data: bool = True) -> list[PlannedRun]:
    """List skipped rows, then return the distinct run folders not done yet (teachers first), after
    opening their datasets (`check_datasets`) unless `open_data` is off (Slurm)."""
    check_writable(sweep.results)
    first_seed = min((p.seed for p in plans), default=0)
    for p in plans:
        if p.skipped and p.seed == first_seed:
            console.print(f"[yellow]skip[/yellow] {p.key}: {p.skipped}")
    unique, seen = [], set()
    for p in plans:
        if p.cfg is not None and str(p.out) not in seen:
            seen.add(str(p.out))
            if not p.done():
                unique.append(p)
    if open_data:
        check_datasets(unique)
    again = sum(1 for p in unique if p.recorded())
    console.print(f"{sweep.title}: {len(unique)} run(s) to train, {len(seen) - len(unique)} already done"
                  + (f"; {again} of them recorded without a checkpoint, trained again for their weights" if again else ""))
    return unique


def train_locally(plans: Sequence[PlannedRun], sweep: Sweep, progress: bool) -> int:
    """Train the planned runs not done yet here, one after another (each distinct run folder once,
    teachers first). Returns the number of runs that failed or could not start; skipped rows are
    only listed. A run that another process is training (its lock is held) is left to that process.
    SIGINT/SIGTERM stop the sweep after the current run saved its checkpoint; rerunning continues."""
    unique = pending_runs(plans, sweep)
    failed = 0
    for i, p in enumerate(unique, 1):
        console.print(f"[{i}/{len(unique)}] {p.key} seed {p.seed} -> {p.out}")
        if not all(dependency_finished(d) for d in p.depends_on):
            console.print(f"[red]skip[/red] {p.key}: its teacher did not finish")
            failed += 1
            continue
        if torch.cuda.is_available():  # peak memory per run, not per process
            torch.cuda.reset_peak_memory_stats()
        try:
            train(p.cfg, resume="auto", show_progress=progress)
        except Interrupted:
            raise
        except RunLocked as e:
            console.print(f"[yellow]skip[/yellow] {p.key}: {e} (rerun `sdesbench run` when it has finished)")
        except SdesbenchError as e:
            console.print(f"[red]failed[/red] {p.key}: {e}")
            failed += 1
    return failed


def check_launcher(launcher: str) -> None:
    """A known launcher whose optional dependency is installed, or one clear line."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown launcher {launcher!r}; choose {' or '.join(LAUNCHERS)}")
    if launcher == "slurm" and importlib.util.find_spec("submitit") is None:
        raise SdesbenchError("--launcher slurm needs submitit: pip install 'sdesbench[cluster]'")


@dataclass
class Job:
    run: PlannedRun
    after: list[int] = field(default_factory=list)  # indices (in the job list) of jobs that must succeed first


def job_graph(runs: Sequence[PlannedRun]) -> list[Job]:
    """Jobs for the runs still to do, each teacher before its students.

    `runs` holds one entry per output folder still to train. A dependency that is not among
    them must already be finished (its results.json completed); otherwise the plan is wrong.
    """
    by_dir = {str(r.out): r for r in runs}
    order: list[PlannedRun] = []
    state: dict[str, str] = {}

    def visit(r: PlannedRun, chain: tuple[str, ...]) -> None:
        key = str(r.out)
        if state.get(key) == "done":
            return
        if key in chain:
            raise ConfigError(f"run {r.key} depends on itself through {' -> '.join(chain)}")
        for dep in r.depends_on:
            if dep in by_dir:
                visit(by_dir[dep], chain + (key,))
            elif not dependency_finished(dep):
                raise ConfigError(f"run {r.key} needs {dep}, which is neither finished nor planned")
        state[key] = "done"
        order.append(r)

    for r in runs:
        visit(r, ())
    index = {str(r.out): i for i, r in enumerate(order)}
    return [Job(r, [index[d] for d in r.depends_on if d in index]) for r in order]


class Executor(Protocol):  # what submit() needs of a submitit executor
    def update_parameters(self, **kwargs: Any) -> None: ...

    def submit(self, fn: Any, *args: Any) -> Any: ...


def train_in_process_group(cfg_dict: dict[str, Any], cwd: str, progress: bool = False) -> RunRecord:
    """Train one run (resuming) in this process, joining the process group that RANK/WORLD_SIZE/
    MASTER_PORT describe when they are set (a Slurm task, a torchrun-style group of `parallel`).
    `progress`: the Trainer's plain progress lines when this process's stderr is not a terminal (a
    Slurm log, a file); never its live bar, which the runs sharing a terminal could not share."""
    os.chdir(cwd)  # run folders and teacher checkpoints are relative to where the sweep was started
    D.init_from_env()
    try:
        return train(build_config(cfg_dict), resume="auto", show_progress=progress and not console.is_terminal)
    finally:
        D.cleanup()


class TrainJob:
    """The submitted callable: train one run (resuming), under DDP when the job has several tasks."""

    def __call__(self, cfg_dict: dict[str, Any], cwd: str) -> dict[str, Any] | None:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        rank = int(os.environ.get("RANK", 0))
        rec = train_in_process_group(cfg_dict, cwd, progress=True)  # the job's log shows how far it is
        return {"miou": rec.metrics.miou, "pixel_acc": rec.metrics.pixel_acc} if rank == 0 and rec.metrics else None

    def checkpoint(self, cfg_dict: dict[str, Any], cwd: str) -> Any:
        """On a time limit submitit requeues this call; the Trainer resumes from its last checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(), cfg_dict, cwd)


def submit(jobs: Sequence[Job], executor: Executor, extra_slurm: dict[str, Any] | None = None,
           fn: Any = None) -> list[Any]:
    """Submit in order; a job waits (afterok) for the jobs it depends on. Returns submitit's job handles."""
    fn = fn or TrainJob()
    ids: list[str] = []
    handles: list[Any] = []
    cwd = os.getcwd()
    for job in jobs:
        extra = dict(extra_slurm or {})
        if job.after:
            extra["dependency"] = "afterok:" + ":".join(ids[i] for i in job.after)
        executor.update_parameters(name=f"sdes-{job.run.key}"[:100], slurm_additional_parameters=extra)
        submitted = executor.submit(fn, job.run.cfg.to_dict(), cwd)
        ids.append(str(submitted.job_id))
        handles.append(submitted)
    return handles


def slurm_executor(folder: Path, partition: str | None, gpus: int, time_min: int, sets: Sequence[str],
                   cluster: str | None = None) -> tuple[Executor, dict[str, Any]]:
    """A submitit executor for the sweep; `sets` are extra `key=value` submitit parameters
    (`slurm_account=abc`, `mem_gb=64`, ...; `slurm_<sbatch option>` keys not known to submitit go
    to `slurm_additional_parameters`)."""
    check_launcher("slurm")
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
    except RuntimeError as e:  # e.g. no srun/sbatch on this machine
        raise SdesbenchError(f"--launcher slurm: {e}") from None
    params: dict[str, Any] = {"timeout_min": time_min, "nodes": 1, "gpus_per_node": gpus,
                              "tasks_per_node": max(gpus, 1), "cpus_per_task": 8}
    if partition:
        params["slurm_partition"] = partition
    extra: dict[str, Any] = {}
    known = executor._valid_parameters() | {"name"}
    for text in sets:
        if "=" not in text:
            raise ConfigError(f"--slurm-set expects key=value, got {text!r}")
        key, _ = text.split("=", 1)
        value = parse_override(f"x.{text}")[1]
        if key in known or f"slurm_{key}" in known:
            params[key if key in known else f"slurm_{key}"] = value
        elif key.startswith("slurm_"):
            extra[key[len("slurm_"):]] = value
        else:
            raise ConfigError(f"--slurm-set: unknown submitit parameter {key!r}")
    executor.update_parameters(**params)
    return executor, extra


def submit_runs(runs: Sequence[PlannedRun], results: Path, partition: str | None, gpus: int, time_min: int,
                sets: Sequence[str]) -> list[tuple[PlannedRun, str]]:
    """`sdesbench run --launcher slurm`: submit every run still to do; returns (run, job id) pairs."""
    jobs = job_graph(runs)
    if not jobs:
        return []
    executor, extra = slurm_executor(Path(results) / "slurm", partition, gpus, time_min, sets, cluster="slurm")
    handles = submit(jobs, executor, extra)
    return [(j.run, str(h.job_id)) for j, h in zip(jobs, handles)]


def submit_to_slurm(plans: Sequence[PlannedRun], sweep: Sweep, partition: str | None, gpus: int, time_min: int,
                    sets: Sequence[str]) -> list[tuple[PlannedRun, str]]:
    """`sdesbench run --launcher slurm`: the runs still to do as jobs; returns (run, job id) pairs."""
    check_launcher("slurm")
    submitted = submit_runs(pending_runs(plans, sweep, open_data=False), sweep.results, partition, gpus, time_min, sets)
    for run, job_id in submitted:
        console.print(f"submitted {job_id}: {run.key} seed {run.seed} -> {run.out}")
    return submitted
