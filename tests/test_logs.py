"""Logs where stdout/stderr is not a terminal (a Slurm/submitit log, CI, nohup, `| tee`): a plain line
per logged iteration and per evaluation, nothing wrapped or cut, and times that add up (issue 19).

The commands run in a subprocess with both streams piped, as on a cluster, without `COLUMNS` (a batch
job has none), into folders whose paths are longer than any terminal is wide."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, cli_env
from sdesbench.console import Console
from test_reliability_cli import write_spec

ITERS, LOG_EVERY, EVAL_EVERY, BATCH = 12, 4, 6, 2
ARGS = ["--model", "enet", "--dataset", "tiny", "--iters", str(ITERS), "--set", f"train.log_every={LOG_EVERY}",
        "--set", f"eval.every={EVAL_EVERY}", "--set", f"data.batch_size={BATCH}", "--set", "data.crop=48",
        "--set", "eval.max_images=4", "--set", "train.checkpoint_every=6"]
ITER_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  (\S+) (\S+)  iter \[\s*(\d+)/(\d+)\]  loss (\S+) \((.*)\)  "
                       r"lr (\S+)  (\S+) img/s  (\S+) s/iter \(data (\S+)\)  eta (\d+):(\d\d):(\d\d)  "
                       r"peak mem (\d+) MB$")
EVAL_LINE = re.compile(r"  (final eval|eval) \[\s*(\d+)/(\d+)\]  mIoU (\S+)  PA (\S+)  \((\d+) images\)$")


def piped(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    """The command line with stdout and stderr piped, no COLUMNS; and how long it took."""
    env = cli_env()
    env.pop("COLUMNS")
    env.pop("FORCE_COLOR", None)
    env.pop("TTY_COMPATIBLE", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sdesbench", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    return proc, time.perf_counter() - t0


def long_folder(tmp_path: Path) -> Path:
    folder = tmp_path / ("a-results-folder-with-a-long-name-" * 3) / ("and-another-level-of-folders-" * 3) / "run"
    assert len(str(folder)) > 250  # wider than any terminal: rich would break it
    return folder


def test_a_piped_training_logs_plain_lines_that_agree_with_its_record(tmp_path):
    out = long_folder(tmp_path)
    proc, took = piped("train", *ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr + proc.stdout and "━" not in proc.stderr  # no colour codes, no bar
    record = json.loads((out / "results.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_log = {e["iter"]: e for e in log if "loss" in e}

    # one line per log_every, with the iteration counter iter/total, the run's name and every number
    lines = [m for m in map(ITER_LINE.match, proc.stderr.splitlines()) if m]
    assert [int(m[3]) for m in lines] == list(range(LOG_EVERY, ITERS + 1, LOG_EVERY)), proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if "  iter [" in ln]) == len(lines)  # no other form
    seen = 0.0
    for m in lines:
        it = int(m[3])
        event = train_log[it]
        assert (m[1], m[2], int(m[4])) == ("student/enet", out.name, ITERS)
        assert float(m[5]) == round(event["loss"], 4) and m[6] == f"ss {event['ss']:.4f}"
        assert float(m[7]) == float(f"{event['lr']:.3e}")
        # images/s, s/iter and the loader's share are one measurement: batch / s/iter, over the interval
        assert float(m[8]) == round(event["images_per_s"], 2)
        assert abs(event["images_per_s"] - BATCH / event["iter_s"]) <= 1e-3 * event["images_per_s"] + 1e-3
        assert 0 <= event["data_s"] <= event["iter_s"] and float(m[9]) == round(event["iter_s"], 3)
        # the ETA extrapolates the mean iteration time so far (loader waits included) to the iterations left
        seen += event["iter_s"] * LOG_EVERY
        eta = int(m[11]) * 3600 + int(m[12]) * 60 + int(m[13])
        assert abs(eta - seen / it * (ITERS - it)) <= 1.0, (m[0], seen)
        assert 0 < int(m[14]) <= record["peak_memory_mb"] + 1
    # the periodic evaluation at 6, and the final one (which the evaluation at 12 would only repeat)
    evals = [m for m in map(EVAL_LINE.search, proc.stderr.splitlines()) if m]
    assert [(m[1], int(m[2])) for m in evals] == [("eval", EVAL_EVERY), ("final eval", ITERS)], proc.stderr
    first = next(e for e in log if "val" in e)["val"]
    assert (float(evals[0][4]), float(evals[0][5]), int(evals[0][6])) == \
        (round(100 * first["miou"], 2), round(100 * first["pixel_acc"], 2), first["images"])
    assert float(evals[1][4]) == round(100 * record["metrics"]["miou"], 2)

    # the results path whole, on one line of its own run's summary
    path = str(out / "results.json")
    [summary] = [ln for ln in proc.stdout.splitlines() if path in ln]
    assert summary.endswith(f"-> {path}")

    # the record's times: the real wall time holds the steps and every part of the breakdown
    t = record["timings"]
    assert record["schema"] == 7
    assert record["step_time_s"] <= t["train_s"] <= record["wall_time_s"] < took
    assert sum(t.values()) <= record["wall_time_s"] + 0.01  # the parts do not overlap
    assert t["eval_s"] > 0 and t["checkpoint_s"] > 0 and t["setup_s"] > 0
    # the log's per-interval times add up to the record's totals (two measurements, rounded to 1e-5 s)
    assert abs(sum(e["iter_s"] for e in train_log.values()) * LOG_EVERY - t["train_s"]) < 0.01
    steps = sum(e["iter_s"] - e["data_s"] for e in train_log.values()) * LOG_EVERY
    assert abs(steps - record["step_time_s"]) < 0.01
    assert abs(record["iters_per_s"] - ITERS / t["train_s"]) <= 1e-3 * record["iters_per_s"]
    # the end-of-run line says where the wall time went, from the record
    [timeline] = [ln for ln in proc.stdout.splitlines() if ln.startswith("time: ")]
    assert timeline.startswith(f"time: {record['wall_time_s']:.1f} s wall = setup {t['setup_s']:.1f} ")
    assert f"training {t['train_s']:.1f} (steps {record['step_time_s']:.1f}, " in timeline


def test_a_piped_sweep_prints_whole_lines_and_its_runs_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("SDESBENCH_EXPERIMENTS", str(write_spec(tmp_path / "specs", "tabl", iters=3)))
    results = long_folder(tmp_path)
    proc, _ = piped("run", "tabl", "--preset", "smoke", "--results", str(results))
    assert proc.returncode == 0, proc.stderr
    [folder] = [p.parent for p in results.glob("runs/*/*/*/*/results.json")]
    assert f"[1/1] ENet/Ours seed 0 -> {folder}" in proc.stderr.splitlines()
    iters = [int(m[3]) for m in map(ITER_LINE.match, proc.stderr.splitlines()) if m]
    assert iters == [1, 2, 3], proc.stderr  # the spec logs every iteration
    assert any(ln.endswith(f"wrote {results / 'tabl-smoke.md'}, {results / 'tabl-smoke.csv'}")
               for ln in proc.stderr.splitlines()), proc.stderr


def test_off_a_terminal_no_line_is_wrapped_or_cut(monkeypatch):
    from rich.table import Table

    monkeypatch.setenv("COLUMNS", "40")  # exported by a shell into a job whose output is a file
    table = Table()
    for col in ("class", "share"):
        table.add_column(col)
    table.add_row("a class name " * 10, "12.5")
    path = "/data/" + "folder/" * 30 + "results.json"
    for width in (None, 40):
        buf = io.StringIO()  # not a terminal
        console = Console(file=buf, terminal_width=width)
        console.print(table)
        console.print(f"written to {path}")
        lines = buf.getvalue().splitlines()
        assert any(("a class name " * 10).strip() in ln for ln in lines) and f"written to {path}" in lines
    # on a terminal, rich lays out as it always did (wrapped to the terminal's width)
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, color_system=None).print(f"written to {path}")
    assert f"written to {path}" not in buf.getvalue().splitlines()
    assert max(len(ln) for ln in buf.getvalue().splitlines()) <= 40


def test_a_resumed_run_sums_the_times_of_its_sessions(tmp_path, monkeypatch):
    """Stopped by a signal at iteration 4 (its checkpoint holds its times), then resumed: the record's
    times are the first session's plus the second's, which the test measures around each."""
    import signal

    import pytest
    import torch

    from sdesbench.engine.configure import build_config
    from sdesbench.engine.state import HookBase
    from sdesbench.engine.record import read_record
    from sdesbench.engine.trainer import Trainer, train
    from sdesbench.errors import Interrupted
    from sdesbench.io import load_checkpoint

    class StopAtFour(HookBase):
        def after_step(self, trainer):
            if trainer.state.iteration == 4:
                trainer.state.stop_signal = signal.SIGTERM

    torch.set_num_threads(1)
    cfg = build_config({}, ["model.name=enet", "data.name=tiny", "train.iters=8", "data.batch_size=2", "data.crop=32",
                            "eval.max_images=2", "train.checkpoint_every=4", f"output.dir={tmp_path}"])
    original = Trainer.build_hooks
    monkeypatch.setattr(Trainer, "build_hooks", lambda self: original(self) + [StopAtFour()])
    t0 = time.perf_counter()
    with pytest.raises(Interrupted):
        train(cfg, show_progress=False)
    first = time.perf_counter() - t0
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["iteration"] == 4 and 0 < state["timings"]["train_s"] <= state["wall_s"] < first
    stopped = read_record(tmp_path)
    monkeypatch.setattr(Trainer, "build_hooks", original)
    t0 = time.perf_counter()
    rec = train(cfg, resume="required", show_progress=False)
    second = time.perf_counter() - t0
    assert rec.iterations == 8 and stopped.wall_time_s < first
    # the second session's wall time is added to what the checkpoint held: at most the time the test saw
    # it take, at least the iterations it trained
    added = rec.wall_time_s - state["wall_s"]
    assert rec.timings.train_s - state["timings"]["train_s"] < added <= second
    assert rec.timings.train_s > state["timings"]["train_s"] and rec.step_time_s >= state["elapsed"]
    assert rec.step_time_s <= rec.timings.train_s and sum(vars(rec.timings).values()) <= rec.wall_time_s + 0.01


def test_the_eta_extrapolates_the_mean_iteration_time_not_the_last_step(tmp_path):
    from sdesbench.engine.hooks import eta_s, eta_text
    from sdesbench.engine.state import TrainState

    state = TrainState(total_iters=100)
    assert state.mean_iter_s is None and eta_text(eta_s(state)) == "?"
    # resumed at 20; this session: 5 iterations in 10 s of loader waits and steps, the last one fast
    state.start_iter, state.iteration = 20, 25
    state.timings.train_s, state.last_data_s, state.last_step_s = 10.0, 0.0, 0.1
    state.timings.eval_s = 50.0  # evaluations are not iterations
    assert state.mean_iter_s == 2.0 and eta_s(state) == 2.0 * 75
    assert eta_text(eta_s(state)) == "0:02:30"
