"""Training a table's runs here: one after another (no flag), one per GPU (`--gpus`), per GPU group under DDP
(`--gpus-per-run`), or per CPU worker (`--workers`): one loop, `train_concurrently`, over slots.

Slots. `plan_slots` turns the flags into slots: each slot is where one run trains at a time, with the
GPUs it sees (`CUDA_VISIBLE_DEVICES`, so every run addresses its GPU as `cuda:0`), the torch threads
of each of its processes (the machine's cores shared evenly), and, for a group of several GPUs, the
`MASTER_PORT` of its torchrun-style process group (`base_port + slot`, so two groups never meet).
Without a flag there is one slot, and its runs train in this very process (`InThisProcess`): the
sequential launcher is this loop with one slot.

Order. `plan.Schedule` holds the one rule: when a slot is free, the first run still to do (in plan
order, teachers and stage runs first) whose dependencies have all completed starts there; a run whose
dependency failed (or was itself blocked) never starts and counts as failed; every other run goes on
regardless of failures. How each run ended is `launch.run_outcome`'s mapping, printed by `report_outcome`.

Runner. Each slot has one worker process, a one-process `concurrent.futures.ProcessPoolExecutor`
started with the spawn method (no CUDA state or torch threads inherited from this process), whose
initializer sets the slot's GPUs and threads before anything touches CUDA; the slot's runs train in
it one after another (each run's peak memory, CUDA or resident set, restarts at its setup, as it does
sequentially). A process is started
once per slot, not per run: importing torch and the suite takes seconds, which a run of the smoke
presets would feel. A process that dies (out of memory, a crash) fails its run and is replaced. A
slot with several processes runs each run under `torch.distributed.launcher.elastic_launch`
(torchrun's own library) with a static rendezvous at 127.0.0.1:`master_port`.

submitit's `LocalExecutor` (the Slurm launcher's library) was considered as the runner and not used: it starts
every job the moment it is submitted (no limit of one run per GPU), gives each job the first
`gpus_per_node` of `visible_gpus` (free GPUs would be tracked here anyway), has no dependencies
between local jobs (`afterok` is a Slurm feature), kills a job after `timeout_min` (2 minutes unless
set), starts one controller process per job, and it is an optional dependency; the standard
library's executor needs none of that. (The tests run Slurm's job callable through it, scheduled by this
loop: `launch.SubmititJobs`.)

Interruption. SIGINT/SIGTERM stop starting runs; the signal is passed to the running runs, whose
Trainers save a checkpoint and stop; the sweep then raises `Interrupted`, and rerunning the same
command continues every run from its checkpoint (the runs are trained with `resume="auto"`).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from sdesbench.engine.configure import build_config
from sdesbench.engine.trainer import train
from sdesbench.errors import ConfigError, Interrupted, SdesbenchError
from sdesbench.experiments.launch import console, pending_runs, run_outcome, train_in_process_group
from sdesbench.experiments.plan import PlannedRun, Schedule, Sweep

BASE_PORT = 29500  # torchrun's default MASTER_PORT; slot i of a DDP group uses BASE_PORT + i


@dataclass(frozen=True)
class Slot:
    """Where one run trains at a time."""

    index: int
    gpus: tuple[int, ...] = ()  # physical GPU ids it sees; () = whatever the process sees (CPU, or all GPUs)
    threads: int = 1  # torch intra-op threads per process
    procs: int = 1  # processes per run (DDP when > 1)
    master_port: int | None = None  # the process group's port when procs > 1

    def describe(self) -> str:
        where = f"GPU {','.join(map(str, self.gpus))}" if self.gpus else "CPU" if not torch.cuda.is_available() \
            else "default device"
        return where + (f", {self.procs} processes (port {self.master_port})" if self.procs > 1 else "")


def parse_gpus(text: str) -> list[int]:
    """'0,1,2,3' -> [0, 1, 2, 3]; one clear line for anything else."""
    try:
        gpus = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--gpus expects comma-separated GPU indices, e.g. 0,1,2,3; got {text!r}") from None
    if not gpus or min(gpus) < 0:
        raise ConfigError(f"--gpus expects non-negative GPU indices, got {text!r}")
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus names a GPU twice: {text!r}")
    return gpus


def plan_slots(gpus: Sequence[int] | None = None, gpus_per_run: int = 1, workers: int | None = None,
               cpu_count: int | None = None, base_port: int = BASE_PORT) -> list[Slot]:
    """Slots for `--gpus` (consecutive groups of `gpus_per_run`) or `--workers` (CPU, or the default device)."""
    cpus = cpu_count or os.cpu_count() or 1
    if gpus_per_run < 1:
        raise ConfigError(f"--gpus-per-run must be at least 1, got {gpus_per_run}")
    if not gpus:
        if gpus_per_run > 1:
            raise ConfigError("--gpus-per-run needs --gpus (the GPUs to group)")
        n = workers or 1
        if n < 1:
            raise ConfigError(f"--workers must be at least 1, got {n}")
        return [Slot(i, threads=max(1, cpus // n)) for i in range(n)]
    if workers is not None:
        raise ConfigError("give either --gpus (one run per GPU or GPU group) or --workers, not both")
    if len(gpus) % gpus_per_run:
        raise ConfigError(f"--gpus names {len(gpus)} GPUs, not a multiple of --gpus-per-run {gpus_per_run}")
    groups = [tuple(gpus[i:i + gpus_per_run]) for i in range(0, len(gpus), gpus_per_run)]
    threads = max(1, cpus // len(gpus))  # every process of every run gets the same share
    return [Slot(i, g, threads, len(g), base_port + i if len(g) > 1 else None) for i, g in enumerate(groups)]


def check_gpus(gpus: Sequence[int]) -> None:
    """The GPUs exist here, as this process sees them (counted without creating a CUDA context)."""
    n = torch.cuda.device_count()
    if n == 0:
        raise SdesbenchError("--gpus: no CUDA device is available here (use --workers N on a CPU)")
    missing = [g for g in gpus if g >= n]
    if missing:
        raise ConfigError(f"--gpus: GPU {missing[0]} does not exist; this machine has {n} (0..{n - 1})")


# ----------------------------------------------------------------------------- running


def visible_devices(gpus: Sequence[int], inherited: str | None) -> str:
    """`CUDA_VISIBLE_DEVICES` for a slot: `--gpus` indices are the devices this process sees, so under
    an inherited `CUDA_VISIBLE_DEVICES` (a job scheduler's) they are positions in that list."""
    if inherited is None or not inherited.strip():
        return ",".join(map(str, gpus))
    seen = [d.strip() for d in inherited.split(",") if d.strip()]
    return ",".join(seen[g] for g in gpus)


def enter_slot(slot: Slot) -> None:
    """Executor initializer, in the slot's fresh process: its GPUs and threads, before CUDA starts."""
    if slot.gpus:
        if "CUDA_VISIBLE_DEVICES" not in os.environ:
            os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # the indices nvidia-smi shows
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(slot.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    os.environ["OMP_NUM_THREADS"] = str(slot.threads)  # inherited by DDP processes and loader workers
    torch.set_num_threads(slot.threads)


def rank_main(cfg_dict: dict[str, Any], cwd: str, progress: bool = False) -> dict[str, Any]:
    """One process of a run (its only one, or one rank of its process group): train, resuming, and say how it
    ended (`launch.run_outcome`)."""
    return run_outcome(lambda: train_in_process_group(cfg_dict, cwd, progress))


def run_in_slot(cfg_dict: dict[str, Any], cwd: str, slot: Slot, progress: bool = False) -> dict[str, Any]:
    """The executor task: the run in this process, or in a process group of `slot.procs` processes
    (`progress`: `launch.train_in_process_group`)."""
    if slot.procs == 1:
        return rank_main(cfg_dict, cwd, progress)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=slot.procs, rdzv_backend="static",
                          rdzv_endpoint=f"127.0.0.1:{slot.master_port}", rdzv_configs={"rank": 0},
                          run_id=f"sdesbench-slot{slot.index}", max_restarts=0)
    results = elastic_launch(config, rank_main)(cfg_dict, cwd, progress)
    return results[0]  # rank 0 trained and wrote the record


class Runner(Protocol):
    """Where `train_concurrently` trains a run: `submit` starts it in a slot and gives a future of its outcome
    (`launch.run_outcome`'s dict); `discard` drops a slot's crashed process; `signal` passes a signal on to the
    running runs; `close` waits for them."""

    def submit(self, slot: Slot, cfg_dict: dict[str, Any], cwd: str) -> Future: ...

    def discard(self, slot: Slot) -> None: ...

    def signal(self, signum: int) -> None: ...

    def close(self) -> None: ...


class InThisProcess:
    """The sequential launcher's runner: the run trains in this process, as `submit` is called (its Trainer
    handles SIGINT/SIGTERM itself, saving a checkpoint), with the live progress bar on a terminal."""

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress

    def submit(self, slot: Slot, cfg_dict: dict[str, Any], cwd: str) -> Future:
        future: Future = Future()
        future.set_result(run_outcome(lambda: train(build_config(cfg_dict), resume="auto",
                                                    show_progress=self.progress)))
        return future

    def discard(self, slot: Slot) -> None:
        pass

    def signal(self, signum: int) -> None:
        pass  # the run in progress has its own handler; between runs there is none to pass it to

    def close(self) -> None:
        pass


class SlotProcesses:
    """One worker process per slot (spawned on first use, set up by `enter_slot`), replaced if it dies.
    `progress`: each run's plain progress lines where stderr is not a terminal (`run_in_slot`)."""

    def __init__(self, progress: bool = False) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.executors: dict[int, ProcessPoolExecutor] = {}
        self.progress = progress

    def submit(self, slot: Slot, *args: Any) -> Future:
        if slot.index not in self.executors:
            self.executors[slot.index] = ProcessPoolExecutor(1, mp_context=self.ctx, initializer=enter_slot,
                                                             initargs=(slot,))
        return self.executors[slot.index].submit(run_in_slot, *args, slot, self.progress)

    def discard(self, slot: Slot) -> None:
        """After a crash (BrokenProcessPool): the next run in this slot gets a new process."""
        executor = self.executors.pop(slot.index, None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def signal(self, signum: int) -> None:
        for executor in self.executors.values():
            for proc in list((getattr(executor, "_processes", None) or {}).values()):  # the executor's own map
                if proc.pid and proc.is_alive():
                    os.kill(proc.pid, signum)

    def close(self) -> None:
        for executor in self.executors.values():
            executor.shutdown(wait=True)


def train_concurrently(plans: Sequence[PlannedRun], sweep: Sweep, slots: Sequence[Slot],
                       processes: Runner | None = None, progress: bool = False) -> int:
    """Train the planned runs not done yet, one per slot at a time, in the order of `plan.Schedule` (module
    docstring). Returns the number of runs that failed or never started because a dependency did not complete;
    raises `Interrupted` after a signal, once the running runs have saved their checkpoints. `processes` runs
    the tasks (default: a spawned worker process per slot, printing progress lines with `progress`)."""
    queue = pending_runs(plans, sweep)
    schedule = Schedule(queue)
    total = len(queue)
    free = sorted(slots, key=lambda s: s.index)
    running: dict[Future, tuple[PlannedRun, Slot]] = {}
    processes = processes or SlotProcesses(progress)
    failed, started = 0, 0
    stop: list[int] = []
    cwd = os.getcwd()

    def on_signal(signum, frame):
        if not stop:
            console.print(f"[yellow]{signal.Signals(signum).name}[/yellow]: no new runs start; the running ones "
                          "save a checkpoint and stop")
        stop.append(signum)
        processes.signal(signum)  # the runs stop as a run stopped by this signal does

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while schedule.queue or running:
            while free and schedule.queue and not stop:
                run, blocked = schedule.take()
                for b in blocked:
                    failed += 1
                    kinds = sorted({d.kind for d in b.dependencies if schedule.state(d.folder) != "completed"})
                    console.print(f"[red]skip[/red] {b.key}: its {' and '.join(kinds) or 'dependency'} did not finish")
                if run is None:
                    break
                slot = free.pop(0)
                started += 1
                where = f" on {slot.describe()}" if len(slots) > 1 else ""
                console.print(f"[{started}/{total}] {run.key} seed {run.seed}{where} -> {run.out}")
                running[processes.submit(slot, run.cfg.to_dict(), cwd)] = (run, slot)
            if not running:
                break  # stopped, or the rest waits on runs that can no longer finish (counted above)
            done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)  # wakes up for signals
            for future in done:
                run, slot = running.pop(future)
                free = sorted(free + [slot], key=lambda s: s.index)
                outcome = _outcome(future)
                if outcome.pop("crashed", False):
                    processes.discard(slot)
                schedule.finish(run, outcome["status"])
                failed += report_outcome(run, outcome)
                if outcome["status"] == "interrupted" and not stop:  # a signal its own Trainer caught
                    stop.append(outcome.get("signal") or signal.SIGINT)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        processes.close()
    if stop:
        raise Interrupted(f"{signal.Signals(stop[0]).name}: the sweep stopped; {len(schedule.queue)} run(s) not "
                          "started, the stopped ones kept their checkpoints; rerun the same command to continue",
                          stop[0])
    return failed


def report_outcome(run: PlannedRun, outcome: dict[str, Any]) -> int:
    """Print how a run ended; 1 if it counts as failed."""
    state = outcome["status"]
    if state == "completed":
        console.print(f"[green]done[/green] {run.key} seed {run.seed}: mIoU {100 * (outcome.get('miou') or 0):.2f}")
    elif state == "locked":
        console.print(f"[yellow]skip[/yellow] {run.key}: {outcome['error']} (rerun `sdesbench run` when it has "
                      "finished)")
    elif state == "interrupted":
        console.print(f"[yellow]stopped[/yellow] {run.key}: {outcome['error']}")
    else:
        console.print(f"[red]failed[/red] {run.key}: {outcome['error']}")
        return 1
    return 0


def _outcome(future: Future) -> dict[str, Any]:
    """The task's status dict; a crash (an error not of the suite, a killed process) is a failure."""
    try:
        return future.result()
    except BaseException as e:  # noqa: BLE001 - one run's crash must not stop the others
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return {"status": "failed", "error": f"{type(e).__name__}: {first}" if first else type(e).__name__,
                "crashed": isinstance(e, BrokenProcessPool)}


def train_here(plans: Sequence[PlannedRun], sweep: Sweep, progress: bool, gpus: Sequence[int] | None = None,
               gpus_per_run: int = 1, workers: int | None = None) -> int:
    """`sdesbench run` / `ablate` with the local launcher: one run after another in this process (no flag: one
    slot), or concurrently in slots (`--gpus`, `--gpus-per-run`, `--workers`). Returns the failures."""
    if not gpus and workers is None and gpus_per_run == 1:
        return train_concurrently(plans, sweep, [Slot(0)], InThisProcess(progress))
    slots = plan_slots(gpus, gpus_per_run, workers)
    if gpus:
        check_gpus(gpus)
    return train_concurrently(plans, sweep, slots, progress=progress)
