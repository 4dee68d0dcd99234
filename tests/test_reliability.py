"""Nothing lost, nothing silent: signals, SIGKILL + resume, numerical faults, locks, disk space.

Each test drives the CLI in a subprocess as a user would and checks the message, the exit
status, and that what was already recorded is intact.
"""
import fcntl
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, assert_one_line_error, popen_cli, read_json, run_cli
from sdesbench.engine.configure import build_config
from sdesbench.errors import SdesbenchError
from sdesbench.experiments.plan import PlannedRun
from sdesbench.experiments.spec import Spec
from sdesbench.report.tables import table_frame

ITERS = 16
ARGS = ["train", "--iters", str(ITERS), "--set", "train.checkpoint_every=4", *FAST]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run that every interrupted-and-resumed run must reproduce bitwise."""
    out = tmp_path_factory.mktemp("reference")
    r = run_cli(*ARGS, "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def wait_for_checkpoint(out: Path, proc, timeout: float = 300) -> Path:
    ckpt = out / "checkpoints" / "last.pt"
    deadline = time.time() + timeout
    while not ckpt.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    return ckpt


def assert_same_run(a: Path, b: Path) -> None:
    ra, rb = read_json(a / "results.json"), read_json(b / "results.json")
    assert ra["status"] == rb["status"] == "completed"
    assert ra["metrics"] == rb["metrics"] and ra["per_class_iou"] == rb["per_class_iou"]
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_at_a_random_point_then_resume_is_bitwise_exact(reference, tmp_path):
    out = tmp_path / "killed"
    proc = popen_cli(*ARGS, "--out", str(out))
    wait_for_checkpoint(out, proc)
    time.sleep(random.Random().uniform(0.0, 1.5))  # somewhere after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:  # finished before the kill landed: nothing to resume
        pytest.skip("run finished before SIGKILL")
    assert not (out / "results.json").exists()
    resumed = run_cli(*ARGS, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference, out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(reference, tmp_path, sig):
    out = tmp_path / sig.name
    proc = popen_cli(*ARGS, "--out", str(out))
    wait_for_checkpoint(out, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("run finished before the signal landed")
    assert proc.returncode == 128 + sig, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {sig.name}: stopped at iteration ") and "--resume" in last
    assert "Traceback" not in stderr
    stopped_at = int(last.split("iteration ")[1].split(",")[0])
    rec = read_json(out / "results.json")
    assert rec["status"] == "interrupted" and rec["iterations"] == stopped_at
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["iteration"] == stopped_at
    resumed = run_cli(*ARGS, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference, out)


def test_nan_loss_stops_names_the_term_and_keeps_last_good_checkpoint(tmp_path):
    # lr 1e30 makes the weights explode after the first step: the loss of iteration 2 is not finite
    r = run_cli("train", "--iters", "6", "--out", str(tmp_path), "--set", "train.lr=1e30", "--set",
                "train.checkpoint_every=1", *FAST)
    assert_one_line_error(r, "non-finite loss term 'ss' at iteration 2", "last good checkpoint is kept (iteration 1)")
    assert r.returncode == 3
    rec = read_json(tmp_path / "results.json")
    assert rec["status"] == "failed" and rec["metrics"] is None and "'ss'" in rec["error"]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # the report shows the run as failed, never as a number
    cfg = build_config({}, [f"output.dir={tmp_path}"])
    df, _ = table_frame([PlannedRun(key="g/r", group="g", row="r", seed=0, cfg=cfg, paper={"miou": 50.0})],
                        Spec(name="t", title="t", presets={}), tmp_path / "results")
    assert df.loc[0, "mIoU"] == "failed" and df.loc[0, "status"].startswith("failed")


def test_a_locked_run_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("kept\n")
    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another sweep is training this run
        r = run_cli("train", "--iters", "2", "--out", str(out), *FAST)
    assert_one_line_error(r, "another process is writing the run in")
    assert (out / "log.jsonl").read_text() == "kept\n"
    assert not (out / "results.json").exists()


def test_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    from collections import namedtuple

    from sdesbench.engine import checkpoint
    from sdesbench.engine import trainer as T

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10 * 2**20, 9 * 2**20, 2**20))
    cfg = build_config({}, [f"output.dir={tmp_path}", "train.iters=1"])
    with pytest.raises(SdesbenchError, match=r"has 1 MiB free; a checkpoint needs about \d+ MiB"):
        T.train(cfg, show_progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_safe_loading_only(tmp_path):
    # a pickle that would run code is refused by weights_only=True, with one line
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"format": "sdesbench-checkpoint-v1", "x": Evil()}))
    assert_one_line_error(run_cli("eval", str(bad)), "is not a readable checkpoint")
    assert not (tmp_path / "pwned").exists()


class _UnreadableDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        from sdesbench.errors import DataError

        raise DataError(f"cannot read /data/img{i}.png: image file is truncated")


def test_worker_errors_reach_the_user_as_one_line():
    # PyTorch re-raises a worker's exception with the worker's traceback as its message
    from sdesbench.cli import one_line
    from sdesbench.errors import DataError

    loader = torch.utils.data.DataLoader(_UnreadableDataset(), num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert "\n" in str(e.value)
    assert one_line(e.value) == "cannot read /data/img0.png: image file is truncated"


def test_atomic_writes_replace_whole_files_with_normal_permissions(tmp_path):
    from sdesbench.io import write_json, write_text

    target = tmp_path / "results.json"
    write_text(target, "old")
    write_json(target, {"miou": 0.5})
    assert read_json(target) == {"miou": 0.5}
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind
