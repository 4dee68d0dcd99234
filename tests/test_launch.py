"""Cluster launcher: teachers are submitted before their students, which wait for them (afterok)."""
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from sdesbench.engine.configure import build_config
from sdesbench.errors import ConfigError
from sdesbench.experiments.plan import Dependency, PlannedRun
from sdesbench.experiments.launch import job_graph, slurm_executor, submit

HAS_SUBMITIT = importlib.util.find_spec("submitit") is not None


def planned(key: str, folder: Path, depends_on=()) -> PlannedRun:
    cfg = build_config({}, ["train.iters=2", "data.batch_size=2", "data.crop=32", "eval.max_images=2",
                            f"output.dir={folder}"])
    return PlannedRun(key=key, group="g", row=key, seed=0, cfg=cfg,
                      dependencies=[Dependency("teacher", str(d)) for d in depends_on],
                      role="teacher" if key.startswith("teacher") else "row")


class RecordingExecutor:
    """Stands in for a submitit executor: numbers jobs 100, 101, ... and records their parameters."""

    def __init__(self):
        self.params, self.submitted = {}, []

    def update_parameters(self, **kw):
        self.params.update(kw)

    def submit(self, fn, cfg_dict, cwd):
        job_id = str(100 + len(self.submitted))
        self.submitted.append((job_id, cfg_dict["output"]["dir"], dict(self.params["slurm_additional_parameters"])))
        return type("J", (), {"job_id": job_id})()


def test_teachers_are_submitted_first_and_students_wait_for_them(tmp_path):
    t1, t2 = tmp_path / "t1", tmp_path / "t2"
    done = tmp_path / "t0"  # a teacher trained earlier (its record and its weights): its students need not wait
    (done / "checkpoints").mkdir(parents=True)
    (done / "results.json").write_text(json.dumps({"status": "completed"}))
    (done / "checkpoints" / "last.pt").write_bytes(b"weights")
    runs = [planned("s-a", tmp_path / "sa", [t1]), planned("s-b", tmp_path / "sb", [t1, t2]),
            planned("s-c", tmp_path / "sc", [done]), planned("teacher:1", t1), planned("teacher:2", t2)]
    jobs = job_graph(runs)
    order = [j.run.key for j in jobs]
    # the order one slot starts them in (plan.Schedule): s-c's teacher is done, so it is ready at once; s-a and
    # s-b wait for teachers placed after them in the list
    assert order == ["s-c", "teacher:1", "s-a", "teacher:2", "s-b"]
    assert [j.after for j in jobs] == [[], [], [1], [], [1, 3]]

    ex = RecordingExecutor()
    ids = [h.job_id for h in submit(jobs, ex, extra_slurm={"account": "lab"})]
    assert ids == ["100", "101", "102", "103", "104"]
    deps = {Path(d).name: extra.get("dependency") for _, d, extra in ex.submitted}
    assert deps == {"sc": None, "t1": None, "sa": "afterok:101", "t2": None, "sb": "afterok:101:103"}
    assert all(extra["account"] == "lab" for _, _, extra in ex.submitted)


def test_a_dependency_neither_done_nor_planned_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither finished nor planned"):
        job_graph([planned("s", tmp_path / "s", [tmp_path / "missing"])])
    recorded = tmp_path / "recorded"  # a teacher's record without its checkpoint (a fresh clone) is not finished
    recorded.mkdir()
    (recorded / "results.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(ConfigError, match="neither finished nor planned"):
        job_graph([planned("s", tmp_path / "s", [recorded])])
    with pytest.raises(ConfigError, match="depends on itself through a -> b"):
        job_graph([planned("a", tmp_path / "a", [tmp_path / "b"]), planned("b", tmp_path / "b", [tmp_path / "a"])])


@pytest.mark.skipif(HAS_SUBMITIT, reason="checks the message shown when submitit is absent")
def test_slurm_launcher_without_submitit_is_one_line(tmp_path):
    proc = run_cli("run", "table3", "--launcher", "slurm", "--results", str(tmp_path), "--no-progress")
    assert_one_line_error(proc, "pip install 'sdesbench[cluster]'")


@pytest.mark.skipif(not HAS_SUBMITIT, reason="submitit is not installed (pip install 'sdesbench[cluster]')")
def test_submitit_runs_a_teacher_then_its_student(tmp_path):
    """submitit's debug executor runs each job in this process: the parameters we pass must be valid."""
    teacher = planned("teacher:r18", tmp_path / "teacher")
    student = planned("student", tmp_path / "student", [tmp_path / "teacher"])
    executor, extra = slurm_executor(tmp_path / "slurm", "gpu", 0, 5, ["slurm_account=lab", "mem_gb=4"],
                                     cluster="debug")
    assert extra == {"account": "lab"}
    jobs = job_graph([student, teacher])
    handles = submit(jobs, executor, extra)
    assert [h.result()["miou"] > 0 for h in handles] == [True, True]  # the debug executor runs them now, in order
    assert json.loads((tmp_path / "teacher" / "results.json").read_text())["status"] == "completed"
    assert json.loads((tmp_path / "student" / "results.json").read_text())["status"] == "completed"
