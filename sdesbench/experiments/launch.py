"""Launching a table's runs: what every launcher shares, and Slurm jobs (`slurm`). Training here, one run
after another or several at once (`--gpus`, `--workers`), is `parallel.py`'s.

Every launcher takes the runs `plan.expand` made, skips the finished ones (`pending_runs`) and trains each
distinct run folder once, in the order of the one rule of `plan.Schedule` (a run starts when what it depends
on has completed); a rerun continues every unfinished run from its last checkpoint (`resume="auto"`). How one
run ended, as its launcher reports it, is `run_outcome`'s mapping, in every process that trains a run.

`slurm`: one submitit job per run still to do, submitted in `plan.launch_order`. A run whose dependency (a
teacher, a stage run) is still to be trained gets the Slurm dependency `afterok:<job ids>`, so it starts only
once they finished successfully (and never if one failed). A job with `--slurm-gpus N > 1` runs N tasks on
one node, one per GPU; submitit's `TorchDistributedEnvironment` exports RANK/WORLD_SIZE/MASTER_ADDR, and
the Trainer runs DDP as under torchrun (`data.batch_size` is per GPU). On a time limit, submitit
signals the job and requeues it (the callable is checkpointable); the requeued job resumes from
the last checkpoint. submitit is an optional dependency (`pip install 'sdesbench[cluster]'`).
`SubmititJobs` runs the same job callable through any submitit executor under the local scheduler's loop
instead of `afterok` (submitit's local executor has no job dependencies): how the tests run Slurm's jobs.
"""
from __future__ import annotations

import importlib.util
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from sdesbench.config import parse_override
from sdesbench.console import err as console
from sdesbench.data.base import build_dataset
from sdesbench.engine import distributed as D
from sdesbench.engine.configure import build_config
from sdesbench.engine.loggers import LOGGERS
from sdesbench.engine.record import RunRecord
from sdesbench.engine.trainer import train
from sdesbench.errors import ConfigError, Interrupted, RunLocked, SdesbenchError
from sdesbench.experiments.plan import PlannedRun, Sweep, launch_order
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


def check_loggers(runs: Sequence[PlannedRun]) -> None:
    """Check once, before the first run, every logger the runs to train name (`output.loggers`: its package, its
    tracking server): a missing extra stops the sweep in one line instead of failing each run in turn with it.
    Each run checks again as it starts (engine/loggers.py), which is what a Slurm job relies on."""
    checked: set[str] = set()
    for run in runs:
        for name in run.cfg.output.loggers:
            if name not in checked:
                checked.add(name)
                LOGGERS[name]().check(run.cfg)


def pending_runs(plans: Sequence[PlannedRun], sweep: Sweep, open_data: bool = True) -> list[PlannedRun]:
    """List skipped rows, then return the distinct run folders not done yet (teachers first), after
    opening their datasets (`check_datasets`) and checking their loggers (`check_loggers`) unless `open_data` is
    off (Slurm)."""
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
        check_loggers(unique)
    again = sum(1 for p in unique if p.recorded())
    console.print(f"{sweep.title}: {len(unique)} run(s) to train, {len(seen) - len(unique)} already done"
                  + (f"; {again} of them recorded without a checkpoint, trained again for their weights" if again else ""))
    return unique


def run_outcome(train_run: Callable[[], RunRecord]) -> dict[str, Any]:
    """Train one run (`train_run`) in this process and say how it ended, as a plain dict that crosses processes
    (an exception would only travel as a traceback): `completed` (with its mIoU), `failed` (the one-line
    error), `locked` (another process trains that folder) or `interrupted` (a signal stopped it after it saved
    its checkpoint; with the signal's number). The peak-memory statistics restart first: a process that
    trains several runs reports each run's own peak."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        rec = train_run()
    except Interrupted as e:
        return {"status": "interrupted", "error": str(e), "signal": e.exit_code - 128}
    except RunLocked as e:
        return {"status": "locked", "error": str(e)}
    except SdesbenchError as e:
        return {"status": "failed", "error": str(e)}
    return {"status": rec.status, "miou": rec.metrics.miou if rec.metrics else None,
            "error": "" if rec.status == "completed" else f"ended {rec.status}"}


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
    """Jobs for the runs still to do in `plan.launch_order`, each after the jobs of its dependencies.

    `runs` holds one entry per output folder still to train. A dependency that is not among
    them must already be finished (its results.json completed); otherwise the plan is wrong.
    """
    order = launch_order(runs)
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
    cfg = build_config(cfg_dict)
    D.init_from_env(cfg.train.dist_timeout_s)
    try:
        return train(cfg, resume="auto", show_progress=progress and not console.is_terminal)
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


class SubmititJobs:
    """The runner of `parallel.train_concurrently` that trains each run as a submitit job (`TrainJob`, the Slurm
    job callable) on `executor`, e.g. submitit's local executor: each job is a process of its own, started when
    the scheduler's rule says so, since that executor has no `afterok`. A job that raises is a failed run."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.waiting = ThreadPoolExecutor(8, thread_name_prefix="submitit-job")  # one thread waits on each job
        self.jobs: dict[int, Any] = {}

    def submit(self, slot: Any, cfg_dict: dict[str, Any], cwd: str) -> Future:
        self.executor.update_parameters(name=f"sdes-{cfg_dict['output']['dir']}"[-100:])
        job = self.executor.submit(TrainJob(), cfg_dict, cwd)
        self.jobs[id(job)] = job
        return self.waiting.submit(self._outcome, job)

    def _outcome(self, job: Any) -> dict[str, Any]:
        try:
            result = job.result()
        except Exception as e:  # noqa: BLE001 - submitit's FailedJobException and the like: the run failed
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            return {"status": "failed", "error": f"job {job.job_id}: {lines[-1] if lines else type(e).__name__}"}
        finally:
            self.jobs.pop(id(job), None)
        return {"status": "completed", "miou": (result or {}).get("miou")}

    def discard(self, slot: Any) -> None:
        pass  # a job's process is its own: nothing of it is reused

    def signal(self, signum: int) -> None:
        for job in list(self.jobs.values()):
            job.cancel(check=False)  # the local executor interrupts the job's process

    def close(self) -> None:
        self.waiting.shutdown(wait=True)


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
