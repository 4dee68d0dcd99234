"""Faults under torchrun, with 2 CPU ranks (gloo) started by `sdesbench train --nproc-per-node 2` (torchrun's
agent): a SIGKILLed rank restarts the group, which continues the last checkpoint and ends with the weights of an
uninterrupted run; with no restarts left the run is recorded failed in one line naming the rank and the signal,
its checkpoint kept for `--resume`; a hanging rank ends the run at `train.dist_timeout_s`.

The faults come from a plugin method (tests/fixtures/plugins/faulty.py): `student` whose rank 1 kills itself or
hangs at a given iteration of the group's first start, and which logs every step each rank computes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli_env, read_json

PLUGIN = ROOT / "tests" / "fixtures" / "plugins" / "faulty.py"
ITERS, EVERY, FAULT_AT = 6, 2, 3  # checkpoints after iterations 2, 4, 6; rank 1 fails in the step after 3 done
ARGS = ["--model", "enet", "--method", "faulty_student", "--iters", str(ITERS), "--device", "cpu",
        "--set", "data.batch_size=2", "--set", "data.crop=32", "--set", "eval.max_images=4",
        "--set", f"train.checkpoint_every={EVERY}", "--no-progress"]


def group(out: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`sdesbench train` of the tiny run on two CPU ranks."""
    cmd = [sys.executable, "-m", "sdesbench", "--plugin", str(PLUGIN), "train", "--nproc-per-node", "2", *ARGS,
           "--out", str(out), *extra]
    full_env = {**cli_env(), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def own_lines(stderr: str) -> list[str]:
    """stderr without torch's C++ warnings of the ranks ("[rank1]:[W...] ... find_unused_parameters ...")."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[rank")]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def steps(log: Path) -> set[tuple[int, int, int]]:
    """(restart, rank, iteration) of every step the plugin saw computed."""
    return {tuple(map(int, line.split())) for line in log.read_text().splitlines()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("faults") / "uninterrupted"
    proc = group(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = read_json(out / "results.json")
    assert rec["status"] == "completed" and rec["world_size"] == 2 and rec["iterations"] == ITERS
    return weights(out)


def test_a_sigkilled_rank_restarts_the_group_which_resumes_and_ends_like_an_uninterrupted_run(uninterrupted,
                                                                                                tmp_path):
    out, log = tmp_path / "run", tmp_path / "steps.txt"
    proc = group(out, "--max-restarts", "1", env={"FAULT": "kill", "FAULT_AT": str(FAULT_AT),
                                                   "FAULT_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = read_json(out / "results.json")
    assert rec["status"] == "completed" and rec["error"] is None and rec["iterations"] == ITERS
    # the first start computed iterations 0..3 (rank 1 died in 3), the restart continued the checkpoint of 2
    seen = steps(log)
    assert {(0, r, i) for r in (0, 1) for i in range(FAULT_AT + 1)} <= seen
    assert {(1, r, i) for r in (0, 1) for i in range(EVERY, ITERS)} == {s for s in seen if s[0] == 1}
    assert_same_weights(weights(out), uninterrupted)


def test_with_no_restarts_left_the_run_is_recorded_failed_in_one_line_and_resume_completes_it(uninterrupted,
                                                                                            tmp_path):
    out = tmp_path / "run"
    proc = group(out, env={"FAULT": "kill", "FAULT_AT": str(FAULT_AT)})
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    expected = (f"rank 1 was killed by SIGKILL; no restarts left (--max-restarts 0); the last checkpoint is kept "
                f"(iteration {EVERY}): continue with --resume")
    assert own_lines(proc.stderr) == [f"error: {expected}"], proc.stderr[-3000:]
    rec = read_json(out / "results.json")
    assert rec["status"] == "failed" and rec["error"] == expected and rec["world_size"] == 2
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["iteration"] == EVERY

    again = group(out, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    rec = read_json(out / "results.json")
    assert rec["status"] == "completed" and rec["iterations"] == ITERS
    assert_same_weights(weights(out), uninterrupted)


def test_a_hanging_rank_ends_the_run_at_dist_timeout_s_in_one_line(tmp_path):
    out = tmp_path / "run"
    proc = group(out, "--set", "train.dist_timeout_s=3", env={"FAULT": "hang", "FAULT_AT": str(FAULT_AT)})
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    expected = (f"rank 0 of 2 at iteration {FAULT_AT + 1}: a collective did not complete within "
                f"train.dist_timeout_s=3 s (another rank hangs or died); the last checkpoint is kept "
                f"(iteration {EVERY})")
    assert own_lines(proc.stderr) == [f"error: {expected}"], proc.stderr[-3000:]
    rec = read_json(out / "results.json")
    assert rec["status"] == "failed" and rec["error"] == expected

    # not part of the run's key (it changes no trained number): the run with torch's default continues this one
    from sdesbench.engine.configure import build_config

    assert build_config({"train": {"dist_timeout_s": 3}}).identity_hash() == build_config({}).identity_hash()
    assert build_config({}).train.dist_timeout_s == 1800


def test_the_cause_of_a_lost_group_is_the_killed_rank_then_the_earliest_failed_one(tmp_path):
    """`give_up` names the rank that brought the group down, not one the agent stopped (SIGTERM) or one that lost
    its peer afterwards; torchrun's own ProcessFailure, as the agent builds it for a rank without an error file."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from sdesbench.engine.elastic import cause

    def failure(rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
        f = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(tmp_path / "none"))
        f.timestamp = timestamp
        return f

    lost_peer, killed, stopped = 4, -9, -15  # DistributedFault's exit status, SIGKILL, the agent's SIGTERM
    assert cause({0: failure(0, lost_peer, 10), 1: failure(1, killed, 11)})[0] == 1
    assert cause({0: failure(0, stopped, 10), 1: failure(1, lost_peer, 11)})[0] == 1
    assert cause({0: failure(0, lost_peer, 12), 1: failure(1, 2, 11), 2: failure(2, stopped, 10)})[0] == 1
    assert cause({0: failure(0, killed, 12), 1: failure(1, killed, 11)})[0] == 1
