"""Shared test helpers: drive the CLI as a user would (a subprocess), small CPU-sized configs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CAMVID = ROOT.parent / "shared" / "data" / "camvid"


# under pytest-xdist (`make test` runs two workers on a 2-core machine) each worker and the processes it
# starts use one thread: two workers with two threads each would oversubscribe the cores many times over
XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST:
    import torch

    torch.set_num_threads(1)


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1" if XDIST else "2")
    env["COLUMNS"] = "200"
    return env


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdesbench", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(), cwd=cwd or ROOT)


def popen_cli(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sdesbench", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=cwd or ROOT)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    for n in needles:
        assert n in err, err


# Tiny, fast training settings shared by the end-to-end tests (batch 4, 48x48 crops).
FAST = ["--set", "data.batch_size=4", "--set", "data.crop=48", "--set", "eval.max_images=10", "--no-progress"]

# A test module's temporary folders go when the module ends, unless one of its tests failed (then they stay
# for a look, as pytest keeps them). Checkpoints of the default DeepLabV3-ResNet-18 are 122 MB each (weights
# and momentum); kept for the whole session the suite wrote 10.4 GB under /tmp (measured at d2d1ed5), more
# than a CI machine had free. `tmp_path_retention_policy = "failed"` (pyproject.toml) removes a passed
# test's own tmp_path at once; this removes the module-scoped fixtures' folders too.
_MODULES_WITH_FAILURES: set[str] = set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _MODULES_WITH_FAILURES.add(item.module.__name__)
    return report


@pytest.fixture(scope="module", autouse=True)
def _remove_the_modules_temporary_folders(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.module.__name__ not in _MODULES_WITH_FAILURES:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid is absent")


def stop_at(iteration: int):
    """A hook that stops the run after `iteration` as a SIGTERM would, once that iteration's checkpoint is
    written (it runs after the checkpoint hook): the first half of a resume test."""
    from sdesbench.engine.state import HookBase, Priority

    class StopAt(HookBase):
        priority = Priority.VERY_LOW  # after CheckpointHook

        def after_step(self, trainer):
            if trainer.state.iteration == iteration:
                trainer.state.stop_signal = signal.SIGTERM

    return StopAt()


def rows_of(md: str) -> dict[str, dict[str, str]]:
    """A long Markdown table's rows by their `Method` cell: {method: {column: cell}}."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {r["Method"]: r for r in (dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
                                     for ln in lines[2:])}
