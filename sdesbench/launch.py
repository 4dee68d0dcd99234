"""Cluster sweeps: submit the runs of a table as Slurm jobs through submitit.

`sdesbench run TABLE --launcher slurm` plans the runs exactly like the local launcher, then
submits one job per run that is not done yet. A student whose teacher is still to be trained
gets the Slurm dependency `afterok:<teacher job id>`, so it starts only once its teacher
finished successfully (and never if it failed). Finished runs are skipped, and a resubmitted
sweep continues each unfinished run from its last checkpoint (`resume=True`), as locally.

A job with `--slurm-gpus N > 1` runs N tasks on one node, one per GPU; submitit's
`TorchDistributedEnvironment` exports RANK/WORLD_SIZE/MASTER_ADDR, and the Trainer runs DDP as
under torchrun (`data.batch_size` is per GPU). On a time limit, submitit signals the job and
requeues it (the callable is checkpointable); the requeued job resumes from the last checkpoint.

submitit is an optional dependency (`pip install 'sdesbench[cluster]'`); only this module needs it.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from sdesbench.config import parse_override
from sdesbench.errors import ConfigError, SdesbenchError
from sdesbench.experiments import PlannedRun


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
            elif not Path(dep, "results.json").is_file():
                raise ConfigError(f"run {r.key} needs {dep}, which is neither finished nor planned")
        state[key] = "done"
        order.append(r)

    for r in runs:
        visit(r, ())
    index = {str(r.out): i for i, r in enumerate(order)}
    return [Job(r, [index[d] for d in r.depends_on if d in index]) for r in order]


def check_launcher(launcher: str) -> None:
    """A known launcher whose optional dependency is installed, or one clear line."""
    if launcher not in ("local", "slurm"):
        raise ConfigError(f"unknown launcher {launcher!r}; choose local or slurm")
    if launcher == "slurm" and importlib.util.find_spec("submitit") is None:
        raise SdesbenchError("--launcher slurm needs submitit: pip install 'sdesbench[cluster]'")


class Executor(Protocol):  # what submit() needs of a submitit executor
    def update_parameters(self, **kwargs: Any) -> None: ...

    def submit(self, fn: Any, *args: Any) -> Any: ...


class TrainJob:
    """The submitted callable: train one run (resuming), under DDP when the job has several tasks."""

    def __call__(self, cfg_dict: dict[str, Any], cwd: str) -> dict[str, Any] | None:
        import submitit

        from sdesbench.config import build_config
        from sdesbench.engine import distributed as D
        from sdesbench.engine.trainer import train

        os.chdir(cwd)  # run folders and teacher checkpoints are relative to where the sweep was started
        if submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            D.init_from_env()
        main = D.is_main()
        try:
            rec = train(build_config(cfg_dict), resume=True, show_progress=False)
        finally:
            D.cleanup()
        return rec.get("metrics") if main else None

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


def submit_launcher(launcher: str, runs: Sequence[PlannedRun], results: Path, partition: str | None, gpus: int,
                    time_min: int, sets: Sequence[str], report_cmd: str) -> None:
    """The few lines `sdesbench run` delegates to for a launcher other than `local`."""
    from rich.console import Console

    check_launcher(launcher)
    err = Console(stderr=True)
    for run, job_id in submit_runs(runs, results, partition, gpus, time_min, sets):
        err.print(f"submitted {job_id}: {run.key} seed {run.seed} -> {run.out}")
    err.print(f"when the jobs have finished: {report_cmd}")
