"""Concurrent local sweeps (`--gpus`, `--gpus-per-run`, `--workers`): slot assignment, the scheduling rule,
the dispatcher's order and failure handling, a DDP group on CPU, and a parallel sweep that writes the
records of the sequential one."""
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, assert_one_line_error, cli_env, read_json, run_cli
from sdesbench.engine.configure import build_config
from sdesbench.errors import ConfigError
from sdesbench.experiments.parallel import (DONE, FAILED, WAITING, Slot, makespan, next_run, parse_gpus, plan_slots,
                                            run_in_slot, train_concurrently, visible_devices)
from sdesbench.experiments.plan import PlannedRun, Sweep


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


def test_the_scheduling_rule_takes_the_first_ready_run_and_drops_the_dead():
    queue = [("s1", ["t"]), ("s2", ["u"]), ("free", []), ("s3", ["t", "v"])]
    state = {"t": WAITING, "u": FAILED, "v": DONE}
    i, dead = next_run(queue, lambda r: r[1], state.get)
    assert (i, dead) == (2, [1])  # s1 waits for t, s2's teacher failed, "free" can start
    state["t"] = DONE
    assert next_run(queue, lambda r: r[1], state.get) == (0, [1])


def test_makespan_by_hand():
    # jobs: 0 teacher (3 h), 1 and 2 its students (2 h each), 3 independent (4 h); two slots.
    # t=0: teacher on A, job 3 on B (students wait); t=3: teacher done, student 1 on A;
    # t=4: job 3 done, student 2 on B; t=5: student 1 done; t=6: student 2 done.
    assert makespan([3, 2, 2, 4], [[], [0], [0], []], 2) == 6
    assert makespan([3, 2, 2, 4], [[], [0], [0], []], 1) == 11  # one slot: the sum
    assert makespan([3, 2, 2, 4], [[], [0], [0], []], 8) == 5  # teacher + a student bounds it


def planned(key: str, folder: Path, depends_on=()) -> PlannedRun:
    cfg = build_config({}, ["train.iters=1", f"output.dir={folder}"])
    return PlannedRun(key=key, group="g", row=key, seed=0, cfg=cfg, depends_on=[str(d) for d in depends_on])


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


def test_parallel_smoke_sweep_writes_the_records_of_the_sequential_one(tmp_path):
    """Same records (metrics, per-class IoU, Ens-T bitwise) with 2 workers as one after another; each
    run has one torch thread either way (CPU results depend on the thread count)."""
    fast = ["--preset", "smoke", "--set", "train.iters=2", "--set", "data.crop=32", "--set", "eval.max_images=3",
            "--no-progress"]
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"

    def run_table(*args):
        proc = subprocess.run([sys.executable, "-m", "sdesbench", "run", "table4", *fast, *args], capture_output=True,
                              text=True, timeout=900, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]

    run_table("--results", str(tmp_path / "seq"))
    run_table("--results", str(tmp_path / "par"), "--workers", "2")
    records = sorted((tmp_path / "seq" / "runs").rglob("results.json"))
    assert len(records) == 5
    for path in records:
        a, b = read_json(path), read_json(tmp_path / "par" / path.relative_to(tmp_path / "seq"))
        assert b["status"] == a["status"] == "completed"
        for key in ("metrics", "per_class_iou", "extra_metrics", "iterations", "config_hash"):
            assert a[key] == b[key], (path, key)
