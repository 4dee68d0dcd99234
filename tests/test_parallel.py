"""Concurrent local sweeps (`--gpus`, `--gpus-per-run`, `--workers`): slot assignment, the scheduling rule,
the dispatcher's order and failure handling, a DDP group on CPU, and a parallel sweep that writes the
records of the sequential one."""
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import assert_one_line_error, cli_env, read_json, run_cli
from sdesbench.engine.configure import build_config
from sdesbench.errors import ConfigError
from sdesbench.experiments.parallel import Slot, parse_gpus, plan_slots, run_in_slot, train_concurrently, visible_devices
from sdesbench.experiments.plan import Dependency, PlannedRun, Schedule, Sweep, makespan, readiness


def test_one_slot_per_gpu_with_its_share_of_the_cores():
    slots = plan_slots([0, 1, 2, 3], cpu_count=16)
    assert [(s.gpus, s.procs, s.threads, s.master_port) for s in slots] == [
        ((0,), 1, 4, None), ((1,), 1, 4, None), ((2,), 1, 4, None), ((3,), 1, 4, None)]


def test_gpu_groups_get_their_own_master_port():
    slots = plan_slots([4, 5, 6, 7], gpus_per_run=2, cpu_count=16, base_port=30000)
    assert [(s.index, s.gpus, s.procs, s.master_port) for s in slots] == [(0, (4, 5), 2, 30000),
                                                                          (1, (6, 7), 2, 30001)]
    assert all(s.threads == 4 for s in slots)  # 16 cores / 4 processes


def test_cpu_workers_share_the_cores():
    assert [(s.gpus, s.threads) for s in plan_slots(workers=2, cpu_count=2)] == [((), 1), ((), 1)]
    assert [s.threads for s in plan_slots(workers=3, cpu_count=16)] == [5, 5, 5]
    assert len(plan_slots(cpu_count=4)) == 1


def test_gpu_indices_are_those_this_process_sees():
    assert visible_devices((2, 3), None) == "2,3"
    assert visible_devices((0, 1), "4,5,6,7") == "4,5"  # a scheduler gave us GPUs 4-7: --gpus 0,1 = its first two
    assert visible_devices((1,), "GPU-aa, GPU-bb") == "GPU-bb"


@pytest.mark.parametrize("kwargs,needle", [
    ({"gpus": [0, 1, 2], "gpus_per_run": 2}, "not a multiple of --gpus-per-run 2"),
    ({"gpus_per_run": 2}, "--gpus-per-run needs --gpus"),
    ({"gpus": [0, 1], "workers": 2}, "either --gpus"),
])
def test_bad_slot_requests_are_refused(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        plan_slots(**kwargs)


@pytest.mark.parametrize("text,needle", [("0,0", "names a GPU twice"), ("a,b", "comma-separated GPU indices"),
                                         ("-1", "non-negative")])
def test_bad_gpu_lists_are_refused(text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_gpus(text)


def test_the_readiness_rule():
    assert readiness([]) == "ready"
    assert readiness(["completed", "completed"]) == "ready"
    assert readiness(["completed", "running"]) == readiness(["waiting"]) == "waiting"
    assert readiness(["running", "failed"]) == readiness(["completed", "blocked"]) == "blocked"


def test_the_schedule_takes_the_first_ready_run_and_blocks_the_dependants_of_a_failure():
    runs = [("s1", ["t"]), ("s2", ["u"]), ("free", []), ("s3", ["t", "v"]), ("s4", ["s2"])]
    # t is planned (first in the queue), u failed before this sweep, v completed before it
    schedule = Schedule([("t", [])] + runs, key=lambda r: r[0], deps=lambda r: r[1], finished={"v": True}.get)
    assert schedule.take() == (("t", []), [("s2", ["u"]), ("s4", ["s2"])])  # s4 is blocked through s2
    assert schedule.state("s4") == "blocked"
    assert schedule.take() == (("free", []), [])  # s1 and s3 wait for t, which is running
    assert schedule.take() == (None, [])
    schedule.finish(("t", []), "completed")
    assert schedule.take() == (("s1", ["t"]), [])
    assert schedule.take() == (("s3", ["t", "v"]), [])
    schedule.finish(("free", []), "locked")  # not completed: counts as failed for its dependants
    assert schedule.state("free") == "failed" and schedule.queue == []


def test_makespan_by_hand():
    # jobs: 0 teacher (3 h), 1 and 2 its students (2 h each), 3 independent (4 h); two slots.
    # t=0: teacher on A, job 3 on B (students wait); t=3: teacher done, student 1 on A;
    # t=4: job 3 done, student 2 on B; t=5: student 1 done; t=6: student 2 done.
    deps = {0: [], 1: ["0"], 2: ["0"], 3: []}
    for slots, hours in ((2, 6), (1, 11), (8, 5)):  # one slot: the sum; 8: teacher + a student bounds it
        assert makespan([0, 1, 2, 3], [3, 2, 2, 4], slots, key=str, deps=deps.get) == hours


def planned(key: str, folder: Path, depends_on=()) -> PlannedRun:
    cfg = build_config({}, ["train.iters=1", f"output.dir={folder}"])
    return PlannedRun(key=key, group="g", row=key, seed=0, cfg=cfg,
                      dependencies=[Dependency("teacher", str(d)) for d in depends_on])


class FakeProcesses:
    """Runs the tasks on threads: each 'trains' for a while, writes its record (completed, or failed
    for the folders named in `failing`) and logs when it started and ended."""

    def __init__(self, failing=(), seconds=0.2):
        self.pool = ThreadPoolExecutor(4)
        self.failing, self.seconds = set(failing), seconds
        self.log: list[tuple[str, str, int, float]] = []
        self.lock = threading.Lock()

    def submit(self, slot: Slot, cfg_dict, cwd) -> Future:
        return self.pool.submit(self.task, slot, cfg_dict["output"]["dir"])

    def task(self, slot: Slot, out: str):
        name = Path(out).name
        with self.lock:
            self.log.append(("start", name, slot.index, time.perf_counter()))
        time.sleep(self.seconds)
        ok = name not in self.failing
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "results.json").write_text(json.dumps({"status": "completed" if ok else "failed"}))
        with self.lock:
            self.log.append(("end", name, slot.index, time.perf_counter()))
        return {"status": "completed", "miou": 0.5} if ok else {"status": "failed", "error": "non-finite loss"}

    def discard(self, slot):
        pass

    def signal(self, signum):
        self.log.append(("signal", str(signum), -1, time.perf_counter()))

    def close(self):
        self.pool.shutdown(wait=True)


def test_teachers_finish_before_their_students_and_a_failure_stops_only_its_students(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t1, t2 = tmp_path / "t1", tmp_path / "t2"
    plans = [planned("teacher:1", t1), planned("teacher:2", t2), planned("a", tmp_path / "a", [t1]),
             planned("b", tmp_path / "b", [t2]), planned("c", tmp_path / "c"), planned("d", tmp_path / "d", [t1])]
    fake = FakeProcesses(failing={"t2"})
    failed = train_concurrently(plans, Sweep("table3", results=tmp_path), plan_slots(workers=2), fake)
    assert failed == 2  # teacher 2 failed, and its student b never started
    events = {(kind, name): (slot, t) for kind, name, slot, t in fake.log}
    assert ("start", "b") not in events
    assert {name for kind, name in events if kind == "end"} == {"t1", "t2", "a", "c", "d"}
    for student in ("a", "d"):
        assert events[("start", student)][1] >= events[("end", "t1")][1]
    starts = sorted((t, name) for (kind, name), (slot, t) in events.items() if kind == "start")
    assert {n for _, n in starts[:2]} == {"t1", "t2"}  # two slots: both teachers first, concurrently
    assert {events[("start", n)][0] for n in ("t1", "t2")} == {0, 1}
    assert read_json(tmp_path / "c" / "results.json")["status"] == "completed"


def test_a_signal_stops_new_runs_reaches_the_running_ones_and_raises_interrupted(tmp_path, monkeypatch):
    import signal

    from sdesbench.errors import Interrupted

    monkeypatch.chdir(tmp_path)
    plans = [planned(name, tmp_path / name) for name in ("a", "b", "c", "d")]

    class SignalledDuringFirstRuns(FakeProcesses):
        def task(self, slot, out):
            if Path(out).name == "a":
                time.sleep(0.1)  # b starts at once in the other slot
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would, while a and b are training
            return super().task(slot, out)

    fake = SignalledDuringFirstRuns(seconds=0.5)
    with pytest.raises(Interrupted) as e:
        train_concurrently(plans, Sweep("table4", results=tmp_path), plan_slots(workers=2), fake)
    assert e.value.exit_code == 128 + signal.SIGTERM and "2 run(s) not started" in str(e.value)
    assert sorted(n for kind, n, _, _ in fake.log if kind == "start") == ["a", "b"]
    assert ("signal", str(int(signal.SIGTERM))) in [(k, n) for k, n, _, _ in fake.log]
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_a_run_stopped_by_its_own_trainer_stops_the_sequential_sweep(tmp_path, monkeypatch):
    """One slot (the sequential launcher trains in this process, and its Trainer catches the signal): the run
    ends `interrupted`, no other run starts, and the sweep raises Interrupted with that signal's status."""
    import signal

    from sdesbench.errors import Interrupted

    monkeypatch.chdir(tmp_path)
    plans = [planned(name, tmp_path / name) for name in ("a", "b", "c")]

    class StoppedDuringB(FakeProcesses):
        def task(self, slot, out):
            if Path(out).name == "b":
                return {"status": "interrupted", "error": "SIGTERM: checkpoint saved", "signal": signal.SIGTERM}
            return super().task(slot, out)

    fake = StoppedDuringB(seconds=0)
    with pytest.raises(Interrupted) as e:
        train_concurrently(plans, Sweep("table4", results=tmp_path), [Slot(0)], fake)
    assert e.value.exit_code == 128 + signal.SIGTERM and "1 run(s) not started" in str(e.value)
    assert [n for kind, n, _, _ in fake.log if kind == "start"] == ["a"] and not (tmp_path / "c").exists()


def test_a_ddp_group_slot_trains_one_run_with_two_processes(tmp_path):
    """The `--gpus-per-run` path (torchrun's elastic launcher, static rendezvous on the slot's port),
    on CPU with gloo: one record, written by rank 0, with world size 2."""
    cfg = build_config({}, ["train.iters=2", "data.batch_size=2", "data.crop=32", "eval.max_images=3",
                            "train.device=cpu", f"output.dir={tmp_path / 'run'}"])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    outcome = run_in_slot(cfg.to_dict(), str(tmp_path), Slot(0, (), 1, 2, 29400 + os.getpid() % 500))
    assert outcome["status"] == "completed"
    rec = read_json(tmp_path / "run" / "results.json")
    assert rec["world_size"] == 2 and rec["metrics"]["miou"] == outcome["miou"]


def test_gpus_without_cuda_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_cli("run", "table4", "--gpus", "0,1", "--results", str(tmp_path), "--no-progress")
    assert_one_line_error(proc, "--gpus: no CUDA device is available here")


def test_bad_combination_fails_before_planning(tmp_path):
    proc = run_cli("run", "table4", "--gpus", "0,1,2", "--gpus-per-run", "2", "--results", str(tmp_path))
    assert_one_line_error(proc, "not a multiple of --gpus-per-run 2")
    assert not (tmp_path / "runs").exists()


# the smallest sweep with what every launcher must get right: a teacher before its student (KL*), an SDES row with
# its extra prediction (Ens-T), on Table 4's network and SDES options (Table 4 itself has no teacher, and its
# seven runs three times over cost 120 s of CPU)
CHAIN = """title: a teacher chain on Table 4's network
presets:
  smoke:
    data: {name: tiny, crop: [32, 32], batch_size: 2}
    train: {iters: 2, checkpoint_every: 1000}
    eval: {max_images: 3}
options:
  sdes: {tau: 5, n_experts: 2, expert: student}
groups:
  - name: EfficientNet-B0
    model: deeplabv3_efficientnet_b0
    rows: [{label: L_SS, method: student}, {label: Ours, method: sdes}, {label: KL*, method: kl, teacher: true}]
"""


def test_sequential_workers_and_submitit_jobs_write_the_same_records_in_dependency_order(tmp_path, monkeypatch):
    """A smoke sweep with a teacher chain (`CHAIN`) trained one after another, with `--workers 2`, and as
    submitit jobs (the Slurm job callable) on submitit's local executor: the same records (key, status, metrics
    bitwise: one torch thread per run every time) and no run started (its config.yaml) before each run it
    depends on completed (its results.json). Each sweep runs in a folder of its own with the same relative
    results folder: the teacher's checkpoint path is part of its students' keys."""
    spec = tmp_path / "chain.yaml"
    spec.write_text(CHAIN)
    sets: tuple[str, ...] = ()
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    for name, extra in (("seq", []), ("par", ["--workers", "2"])):
        (tmp_path / name).mkdir()
        proc = subprocess.run([sys.executable, "-m", "sdesbench", "run", str(spec), "--preset", "smoke",
                               *(a for o in sets for a in ("--set", o)), "--results", "results", "--no-progress",
                               *extra], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = Sweep(str(spec), "smoke", (0,), Path("results"), sets)
    launchers = ["seq", "par"]
    if importlib.util.find_spec("submitit") is not None:
        from sdesbench.experiments.launch import SubmititJobs, slurm_executor

        (tmp_path / "sub").mkdir()
        monkeypatch.chdir(tmp_path / "sub")
        for key in ("OMP_NUM_THREADS", "PYTHONPATH"):  # what each job's process inherits
            monkeypatch.setenv(key, env[key])
        executor, _ = slurm_executor(Path("results") / "slurm", None, 0, 10, [], cluster="local")
        assert train_concurrently(sweep.plans(), sweep, plan_slots(workers=2), SubmititJobs(executor)) == 0
        launchers.append("sub")
    plans = {str(p.out): p for p in sweep.plans()}
    assert any(read_json(tmp_path / "seq" / f / "results.json")["extra_metrics"] for f in plans)  # Ens-T compared
    assert len(plans) == 4 and [p.needs("teacher") for p in plans.values() if p.key.endswith("KL*")] != [[]]
    for folder, plan in plans.items():
        a = read_json(tmp_path / "seq" / folder / "results.json")
        for name in launchers[1:]:
            b = read_json(tmp_path / name / folder / "results.json")
            assert b["status"] == a["status"] == "completed"
            for key in ("config_hash", "metrics", "per_class_iou", "extra_metrics", "iterations"):
                assert a[key] == b[key], (name, folder, key)
        for name in launchers:
            started = (tmp_path / name / folder / "config.yaml").stat().st_mtime_ns
            for dep in plan.depends_on:
                assert (tmp_path / name / dep / "results.json").stat().st_mtime_ns <= started, (name, plan.key, dep)
