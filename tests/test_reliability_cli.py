"""Nothing lost, nothing silent, round two (issue 16): the adverse situations a week of use finds.

One test per situation, each driving the command line in a subprocess as a user would and checking
the one `error:` line, the exit status, and that what was already recorded is intact. Each failed on
the suite before issue 16 (commit b4350e8); docs/reliability.md lists them with the guarantee each
one checks.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, ROOT, assert_one_line_error, cli_env, popen_cli, read_json, run_cli

# ---------------------------------------------------------------------------------------------- helpers

SMALL = ["--model", "enet", *FAST]  # ENet: the fastest model (~7 iterations/s on one CPU core)


def console_script(tmp_path: Path, started: Path | None = None) -> Path:
    """The `sdesbench` script pip installs for the entry point pyproject.toml declares, written the way
    pip/setuptools write console scripts (so the test does not depend on where a venv is). With
    `started`, the script creates that file just before it calls the entry point: the imports (seconds)
    are done, and a signal sent from then on lands inside the command line's handling."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'^\[project\.scripts\]\s*\nsdesbench\s*=\s*"([\w.]+):(\w+)"', text, re.M)
    assert found, "pyproject.toml declares no `sdesbench` console script"
    module, func = found.groups()
    mark = f"    open({str(started)!r}, 'w').close()\n" if started else ""
    script = tmp_path / "sdesbench"
    script.write_text(f"import re\nimport sys\nfrom {module} import {func}\n"
                      "if __name__ == '__main__':\n"
                      "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                      f"{mark}    sys.exit({func}())\n")
    return script


def write_spec(folder: Path, name: str, method: str = "student", iters: int = 2, checkpoint_every: int = 8) -> Path:
    """A one-row table spec on the tiny dataset (ENet, 48x48 crops, 2 evaluation images)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(f"""title: "{name}"
dataset: tiny
metrics: [miou]
presets:
  smoke:
    data: {{name: tiny, crop: [48, 48], batch_size: 4}}
    train: {{iters: {iters}, checkpoint_every: {checkpoint_every}, log_every: 1}}
    eval: {{max_images: 2}}
groups:
  - name: ENet
    model: enet
    rows:
      - {{label: Ours, method: {method}, miou: 50.0}}
""")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def logged_iterations(out: Path) -> list[int]:
    return [json.loads(line)["iter"] for line in (out / "log.jsonl").read_text().splitlines()]


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"ended before {what}: " + "".join(proc.communicate())
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def checkpoint_iteration(out: Path) -> int:
    return int(torch.load(out / "checkpoints" / "last.pt", weights_only=True)["iteration"])


def last_logged(out: Path) -> int:
    """The last complete line's iteration of `out/log.jsonl` (0 while there is none)."""
    path = out / "log.jsonl"
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().split("\n")[:-1] if ln]  # a line being written has no newline yet
    return json.loads(lines[-1])["iter"] if lines else 0


# ---------------------------------------------------------------------------------------------- 1. typos

@pytest.mark.parametrize("args, needles", [
    (["shw"], ["No such command 'shw'"]),
    (["data", "chek"], ["No such command 'chek'"]),
    (["train", "--itres", "3"], ["--itres", "--iters"]),  # click lists the close options
    (["report", "--curvs"], ["--curvs"]),
    (["train", "--iters", "abc"], ["Invalid value for '--iters'"]),
    (["eval"], ["Missing argument"]),
])
def test_usage_errors_through_the_console_script_are_one_line_exit_2(tmp_path, args, needles):
    proc = subprocess.run([sys.executable, str(console_script(tmp_path)), *args], capture_output=True, text=True,
                          env=cli_env(), cwd=tmp_path, timeout=300)
    assert_one_line_error(proc, *needles)
    assert proc.returncode == 2
    err = proc.stderr
    if "Did you mean" in err:  # click's suggestion, where the installed click makes one: a real name
        assert any(f"'{name}'" in err for name in ("show", "list", "check")) or "--iters" in err, err


def test_usage_error_suggests_the_close_command(tmp_path):
    proc = subprocess.run([sys.executable, str(console_script(tmp_path)), "lst"], capture_output=True, text=True,
                          env=cli_env(), cwd=tmp_path, timeout=300)
    assert_one_line_error(proc, "No such command 'lst'")
    assert proc.returncode == 2


# ---------------------------------------------------------------------------------------------- 2. YAML shape

# every section once, alternating a scalar and a list; `method` (the one that crashed) both ways
@pytest.mark.parametrize("section, value, shown", [
    ("model", "sdes", "'sdes'"), ("data", "[sdes]", "list"), ("method", "sdes", "'sdes'"),
    ("method", "[sdes]", "list"), ("teacher", "sdes", "'sdes'"), ("train", "[sdes]", "list"),
    ("eval", "sdes", "'sdes'"), ("output", "[sdes]", "list"),
])
def test_config_section_that_is_not_a_mapping_is_one_line(tmp_path, section, value, shown):
    config = tmp_path / "run.yaml"
    config.write_text(f"{section}: {value}\n")
    r = run_cli("train", "--config", str(config), "--iters", "1", "--out", str(tmp_path / "out"), *SMALL)
    assert_one_line_error(r, f"{section}: expected a mapping, got {shown}")
    assert r.returncode == 2
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- 3. NaN / Inf options

@pytest.mark.parametrize("setting, method, needle", [
    ("train.lr=nan", "student", "train.lr: expected a finite number, got nan"),
    ("train.lr=inf", "student", "train.lr: expected a finite number, got inf"),
    ("train.weight_decay=-inf", "student", "train.weight_decay: expected a finite number, got -inf"),
    ("data.scale=[0.5,.inf]", "student", "data.scale[1]: expected a finite number, got inf"),
    ("method.alpha=inf", "sdes", "method.alpha: expected a finite number, got inf"),
    ("method.tau=nan", "sdes", "method.tau: expected a finite number, got nan"),
])
def test_non_finite_numbers_are_refused_before_training(tmp_path, setting, method, needle):
    r = run_cli("train", "--method", method, "--iters", "1", "--out", str(tmp_path), "--set", setting, *SMALL)
    assert_one_line_error(r, needle)
    assert r.returncode == 2
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "checkpoints").exists()


def test_every_float_option_refuses_nan_and_inf():
    """Every float field (float, float | None, list[float]) of every config section and of every
    method's options, checked in-process through the validation the CLI uses: nan, inf and -inf are
    each one ConfigError naming the key."""
    import dataclasses
    import typing

    from sdesbench.config import RunConfig
    from sdesbench.engine.configure import build_config
    from sdesbench.errors import ConfigError
    from sdesbench.methods import METHODS

    def float_fields(cls) -> list[tuple[str, bool]]:
        """(name, is_list) of the fields of `cls` that hold floats."""
        found = []
        for name, tp in typing.get_type_hints(cls).items():
            args = typing.get_args(tp)
            if tp is float or (float in args and type(None) in args):
                found.append((name, False))
            elif typing.get_origin(tp) is list and args == (float,):
                found.append((name, True))
        return found

    cases = []  # (section, key, is_list, method)
    for section, cls in typing.get_type_hints(RunConfig).items():
        # `request` records what was named, it sets nothing; `plugins`/`plugin_sha256` are lists of sources
        # and hashes, not sections of settings
        if section not in ("method", "request") and dataclasses.is_dataclass(cls):
            cases += [(section, name, is_list, "student") for name, is_list in float_fields(cls)]
    for method in METHODS.names():
        cases += [("method", name, is_list, method) for name, is_list in float_fields(METHODS.get(method).Options)]
    keys = {f"{section}.{key}" for section, key, _, _ in cases}
    assert {"train.lr", "data.scale", "eval.scale", "method.alpha", "method.tau"} <= keys, keys
    for section, key, is_list, method in cases:
        for bad in (math.nan, math.inf, -math.inf):
            data = {"method": {"name": method}, "teacher": {"model": "deeplabv3_resnet18"}}
            data.setdefault(section, {})[key] = [1.0, bad] if is_list else bad
            shown = f"{section}.{key}[1]" if is_list else f"{section}.{key}"
            with pytest.raises(ConfigError, match=re.escape(f"{shown}: expected a finite number, got {bad}")):
                build_config(data)


# ---------------------------------------------------------------------------------------------- 4. spec names

@pytest.mark.parametrize("command", [["run", "tabx", "--dry-run"], ["report", "tabx"]])
def test_spec_row_with_an_unknown_method_is_an_error_with_did_you_mean(tmp_path, monkeypatch, command):
    monkeypatch.setenv("SDESBENCH_EXPERIMENTS", str(write_spec(tmp_path / "specs", "tabx", method="sdes-randm-split")))
    r = run_cli(*command, "--preset", "smoke", "--results", str(tmp_path / "results"))
    assert_one_line_error(r, "unknown method 'sdes-randm-split'", "did you mean 'sdes-random-split'?")
    assert not (tmp_path / "results" / "tabx-smoke.md").exists()


# ---------------------------------------------------------------------------------------------- 5. no silent restart

def test_rerun_of_an_interrupted_run_without_resume_is_refused_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--iters", "200", "--set", "train.checkpoint_every=4", *SMALL, "--out", str(out)]
    proc = popen_cli(*args)
    wait_for(lambda: (out / "checkpoints" / "last.pt").exists(), proc, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    stopped = read_json(out / "results.json")["iterations"]
    before = snapshot(out)
    again = run_cli(*args)  # the same command, without --resume
    assert_one_line_error(again, f"{out}: interrupted at iteration {stopped}: add --resume to continue, "
                                 "or choose another --out")
    assert snapshot(out) == before  # checkpoint, log, record and config untouched


def test_run_continues_a_killed_run_by_itself_and_logs_each_iteration_once(tmp_path, monkeypatch):
    """`sdesbench run` (unlike `train`) resumes unfinished runs: rerunning the sweep after a SIGKILL
    continues from the checkpoint, and the log holds every iteration exactly once, in order."""
    monkeypatch.setenv("SDESBENCH_EXPERIMENTS", str(write_spec(tmp_path / "specs", "tabk", iters=24)))
    results = tmp_path / "results"
    cmd = ["run", "tabk", "--preset", "smoke", "--results", str(results), "--no-progress"]
    proc = popen_cli(*cmd)
    runs = lambda: list(results.glob("runs/*/*/*/*/checkpoints/last.pt"))  # noqa: E731
    wait_for(lambda: bool(runs()), proc, "the checkpoint at iteration 8")
    out = runs()[0].parent.parent
    wait_for(lambda: last_logged(out) >= 10, proc, "iteration 10")
    proc.kill()
    proc.communicate()
    if checkpoint_iteration(out) >= last_logged(out):
        pytest.skip("the kill landed on a checkpoint: no iteration was logged after it")
    assert not (out / "results.json").exists()
    again = run_cli(*cmd)
    assert again.returncode == 0, again.stderr
    assert read_json(out / "results.json")["status"] == "completed"
    assert logged_iterations(out) == list(range(1, 25))


# ---------------------------------------------------------------------------------------------- 7. full disk

@pytest.fixture
def small_disk(tmp_path):
    """A real 80 MiB filesystem (tmpfs) the test can fill up; skipped where it cannot be mounted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Write a file that leaves `leave` bytes free on `disk` (0: until the disk refuses)."""
    st = os.statvfs(disk)
    todo = st.f_bavail * st.f_frsize - leave
    chunk = bytes(2**20)
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while todo > 0:
                todo -= f.write(chunk[:todo])
        except OSError as e:
            assert e.errno == errno.ENOSPC and leave == 0, e


def test_full_disk_during_a_checkpoint_fails_the_run_in_one_line_and_keeps_the_previous_one(small_disk):
    out = small_disk / "run"
    proc = popen_cli("train", "--iters", "64", "--set", "train.checkpoint_every=8", *SMALL, "--out", str(out))
    wait_for(lambda: (out / "checkpoints" / "last.pt").exists(), proc, "the first checkpoint")
    fill(small_disk, leave=2**20)  # room for the log and the record, not for a 3 MB checkpoint
    _, stderr = proc.communicate(timeout=300)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert_one_line_error(r, f"no space left on device writing {out}/checkpoints/last.pt")
    rec = read_json(out / "results.json")
    assert rec["status"] == "failed" and rec["error"] == f"no space left on device writing {out}/checkpoints/last.pt"
    assert checkpoint_iteration(out) == rec["iterations"] - 8  # the previous checkpoint, intact
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name != "last.pt"]  # no temporary file left


@pytest.mark.parametrize("tensorboard", [False, True])
def test_full_disk_while_logging_is_one_line(small_disk, tensorboard):
    out = small_disk / "run"
    proc = popen_cli("train", "--iters", "2000", "--set", "train.checkpoint_every=5000", "--set",
                     "train.log_every=1", "--set", f"output.tensorboard={str(tensorboard).lower()}", *SMALL,
                     "--out", str(out))
    wait_for(lambda: last_logged(out) >= 1, proc, "the first log line")
    fill(small_disk, leave=0)
    _, stderr = proc.communicate(timeout=300)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    # whichever writer meets the full disk first is named (TensorBoard's thread may be first); the record
    # cannot be written either, and the line says so
    writers = [f"{out}/log.jsonl"] + ([f"{out}/tensorboard"] if tensorboard else [])
    assert_one_line_error(r, "the run's record could not be written either "
                             f"(no space left on device writing {out}/results.json)")
    assert any(f"error: no space left on device writing {w};" in r.stderr for w in writers), r.stderr
    assert last_logged(out) < 2000


@pytest.mark.parametrize("table", ["tabd", "fig3"])  # a table (Markdown, CSV); Figure 3 (PNG plots first)
def test_full_disk_while_writing_a_report_is_one_line_and_keeps_the_old_report(small_disk, tmp_path, monkeypatch,
                                                                             table):
    if table == "tabd":
        monkeypatch.setenv("SDESBENCH_EXPERIMENTS", str(write_spec(tmp_path / "specs", "tabd")))
    results = small_disk / "results"
    report = results / f"{table}-smoke.md"
    report.parent.mkdir()
    report.write_text("the previous report\n")
    fill(small_disk, leave=0)
    r = run_cli("report", table, "--preset", "smoke", "--results", str(results))
    assert_one_line_error(r, f"no space left on device writing {results}/{table}-smoke")
    assert report.read_text() == "the previous report\n"
    assert [p.name for p in results.iterdir()] == [report.name]  # no temporary file left


# ---------------------------------------------------------------------------------------------- 8. --resume typo

def test_resume_into_a_folder_without_checkpoint_says_so_and_trains_nothing(tmp_path):
    out = tmp_path / "typo"
    r = run_cli("train", "--iters", "2", *SMALL, "--out", str(out), "--resume")
    assert_one_line_error(r, f"nothing to resume in {out} (no checkpoints/last.pt)")
    assert not (out / "results.json").exists() and not (out / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- 9. smaller ones

def test_nan_before_the_first_checkpoint_says_no_checkpoint_was_written(tmp_path):
    # lr 1e30 makes the weights explode after the first step: the loss of iteration 2 is not finite
    r = run_cli("train", "--iters", "6", "--out", str(tmp_path), "--set", "train.lr=1e30", "--set",
                "train.checkpoint_every=100", *SMALL)
    assert_one_line_error(r, "non-finite loss term 'ss' at iteration 2; no checkpoint had been written yet")
    assert r.returncode == 3
    assert read_json(tmp_path / "results.json")["status"] == "failed"
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_report_shows_an_unreadable_record_as_unreadable(tmp_path, monkeypatch):
    monkeypatch.setenv("SDESBENCH_EXPERIMENTS", str(write_spec(tmp_path / "specs", "tabu")))
    results = tmp_path / "results"
    done = run_cli("run", "tabu", "--preset", "smoke", "--results", str(results), "--no-progress")
    assert done.returncode == 0, done.stderr
    [record] = results.glob("runs/*/*/*/*/results.json")
    record.write_text('{"status": "compl')  # cut by a crash of another tool, or a disk error
    kept = (results / "tabu-smoke.md").read_text()
    r = run_cli("report", "tabu", "--preset", "smoke", "--results", str(results))
    assert r.returncode == 0, r.stderr
    assert f"unreadable: {record} is unreadable (JSONDecodeError)" in r.stdout, r.stdout
    assert "not run yet" not in r.stdout
    # the table on disk holds a measured cell the new one lacks: it is kept, and the note says so
    assert (results / "tabu-smoke.md").read_text() == kept
    assert f"note: kept {results / 'tabu-smoke.md'}" in r.stderr, r.stderr


def test_sigkill_then_resume_logs_each_iteration_exactly_once(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--iters", "24", "--set", "train.checkpoint_every=8", "--set", "train.log_every=1", *SMALL,
            "--set", "eval.max_images=2", "--out", str(out)]
    proc = popen_cli(*args)
    wait_for(lambda: (out / "checkpoints" / "last.pt").exists(), proc, "the checkpoint at iteration 8")
    wait_for(lambda: last_logged(out) >= 10, proc, "iteration 10")
    proc.kill()
    proc.communicate()
    if checkpoint_iteration(out) >= last_logged(out):
        pytest.skip("the kill landed on a checkpoint: no iteration was logged after it")
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert logged_iterations(out) == list(range(1, 25))


@pytest.mark.parametrize("moment", ["starting", "in the command"])
def test_sigint_outside_the_training_loop_prints_interrupted(tmp_path, moment):
    """Ctrl-C while the command line starts (seconds of importing torch and the commands) or during
    `profile` (tens of seconds of FLOP counting, no training loop): one line `error: interrupted`, 130."""
    started = tmp_path / "started"
    # as at a terminal: a test run started in the background (`nohup make test &`, a CI runner) ignores
    # SIGINT, which its children inherit, and then the suite rightly leaves Ctrl-C ignored too
    proc = subprocess.Popen([sys.executable, str(console_script(tmp_path, started)), "profile", "--model",
                             "deeplabv3_resnet101"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if moment == "starting":
        time.sleep(0.5)
        if started.exists():
            proc.kill()
            proc.communicate()
            pytest.skip("the imports took under 0.5 s here: no moment to interrupt them")
    else:
        wait_for(started.exists, proc, "the entry point to be called")
        time.sleep(0.5)  # well inside the command
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines()[-1:] == ["error: interrupted"], stderr
    assert "Traceback" not in stderr, stderr


def test_sigterm_during_the_final_evaluation_records_interrupted_and_resume_only_evaluates(tmp_path):
    # ResNet-50 over the 30 tiny validation images: a few seconds of evaluation to land the signal in
    out = tmp_path / "run"
    args = ["train", "--model", "deeplabv3_resnet50", "--iters", "2", "--set", "data.batch_size=2", "--set",
            "data.crop=48", "--set", "eval.max_images=30", "--set", "train.checkpoint_every=100", "--no-progress",
            "--out", str(out)]
    proc = popen_cli(*args)
    # the only checkpoint is the one at the last iteration, written just before the evaluation starts
    wait_for(lambda: (out / "checkpoints" / "last.pt").exists(), proc, "the final checkpoint")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: SIGTERM: stopped at iteration 2"), stderr
    rec = read_json(out / "results.json")
    assert rec["status"] == "interrupted" and rec["iterations"] == 2 and rec["metrics"] is None
    trained = snapshot(out / "checkpoints"), (out / "log.jsonl").read_bytes()
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    rec = read_json(out / "results.json")
    assert rec["status"] == "completed" and rec["iterations"] == 2 and 0 <= rec["metrics"]["miou"] <= 1
    assert (snapshot(out / "checkpoints"), (out / "log.jsonl").read_bytes()) == trained  # no training step again
