"""Performance plumbing: fp32 loss helpers under autocast, fast class maps, CPU peak memory, `sdesbench bench`."""
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from conftest import cli_env, run_cli
from sdesbench.measure.bench import BenchSettings, run_bench
from sdesbench.measure.memory import peak_bytes
from sdesbench.measure.step_cost import median_interval
from sdesbench.engine.metrics import predict
from sdesbench.errors import ConfigError
from sdesbench.methods.base import Method
from sdesbench.methods.losses import fp32, full_precision, pixel_ce
from sdesbench.models import build_model
from sdesbench.methods import METHODS


def test_full_precision_computes_in_fp32_inside_autocast():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16  # autocast is active here
        half = (a @ b)
        with full_precision():
            x, y = fp32(half, a)
            assert x.dtype == torch.float32 and y.dtype == torch.float32
            assert (y @ b).dtype == torch.float32
    labels = torch.tensor([1, 2])
    assert fp32(labels) is labels  # integer tensors pass unchanged


def test_predict_is_argmax_including_ties():
    logits = torch.randn(2, 5, 7, 9)
    logits[0, 1, 0, 0] = logits[0, 3, 0, 0] = 100.0  # a tie: the first class wins, as with argmax
    assert torch.equal(predict(logits), logits.argmax(1))
    assert predict(logits)[0, 0, 0] == 1


def test_cpu_peak_bytes_replay_allocations():
    def pattern():  # 4 MB, +2 MB (6 alive), free 4 MB, +8 MB (10 alive), free all
        a = torch.empty(1_000_000)
        b = torch.empty(500_000)
        del a
        c = torch.empty(2_000_000)
        del b, c

    assert peak_bytes(pattern, live_before=123, device=torch.device("cpu")) == 123 + 10_000_000
    # nothing allocated is what a profiler that recorded nothing looks like: an error, never a peak of 0
    with pytest.raises(RuntimeError, match="recorded no CPU allocation"):
        peak_bytes(lambda: None, live_before=123, device=torch.device("cpu"))


@pytest.mark.parametrize("level, chatter", [(None, False), ("0", True)])
def test_cpu_peak_bytes_keeps_the_profiler_quiet_unless_asked(level, chatter):
    """Kineto's `profiler_start`/`profiler_stop` lines stay off stderr; a user's KINETO_LOG_LEVEL wins.
    A fresh process each: kineto reads its level once, when the process first profiles."""
    code = ("import torch; from sdesbench.measure.memory import peak_bytes; "
            "print(peak_bytes(lambda: torch.empty(1000), 0, torch.device('cpu')))")
    env = cli_env()
    env.pop("KINETO_LOG_LEVEL", None)
    if level is not None:
        env["KINETO_LOG_LEVEL"] = level
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "4000"  # 1000 float32
    assert ("profiler_start" in proc.stderr) == chatter, proc.stderr


def test_bench_json_structure_and_memory_floor():
    proc = run_cli("bench", "--methods", "student", "--rounds", "2", "--steps", "1", "--warmup", "1", "--crop", "32",
                   "--batch", "2",
                   "--eval-images", "2", "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["device"].startswith("cpu") and r["settings"]["crop"] == 32 and r["settings"]["batch"] == 2
    (student,) = r["methods"]
    assert student["method"] == "student" and student["time_ratio"] == 1.0 and student["memory_ratio"] == 1.0
    assert student["images_per_s"] == pytest.approx(2 / (student["step_ms"] / 1e3), rel=0.01)
    # parameters, their gradients and SGD momentum are all alive at the step's peak
    params = sum(p.numel() for p in build_model("deeplabv3_resnet18", 11).parameters())
    assert student["peak_memory_mb"] >= 3 * 4 * params / 2**20
    assert 0 <= r["eval"]["metric_overhead"] < 1
    assert r["data_loader"]["ratio_to_training_step"] > 0
    assert all("table" in t for t in r["tables"])


def test_bench_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        run_bench(BenchSettings(methods=["nope"], device="cpu"))


class _TeacherKL(Method):
    """Test-only method: CE + KL to a teacher at temperature 4, computed in fp32."""

    needs_teacher = True

    @dataclass
    class Options:
        pass

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        with full_precision():
            s, t = fp32(student_out["logits"], teacher_out["logits"])
            kl = F.kl_div(F.log_softmax(s / 4, 1), F.log_softmax(t / 4, 1), log_target=True, reduction="batchmean")
        return {"ss": pixel_ce(student_out["logits"], labels), "kl": kl}


def test_bench_builds_a_random_teacher_and_counts_its_memory():
    METHODS.register("_test_teacher_kl")(_TeacherKL)
    try:
        r = run_bench(BenchSettings(methods=["_test_teacher_kl"], rounds=1, steps=1, warmup=1, crop=32, batch=2,
                                    eval_images=1,
                                    loader_batches=1, device="cpu", tables=False))
    finally:
        METHODS._entries.pop("_test_teacher_kl")
    student, kd = r["methods"]
    assert kd["method"] == "_test_teacher_kl" and "note" not in kd
    teacher_mb = 4 * sum(p.numel() for p in build_model("deeplabv3_resnet18", 11).parameters()) / 2**20
    assert kd["peak_memory_mb"] - student["peak_memory_mb"] >= teacher_mb  # the teacher's weights stay alive
    assert kd["gflops_per_step"] > student["gflops_per_step"]  # plus the teacher's forward


@pytest.mark.parametrize("n,k", [(6, 1), (10, 2), (20, 6)])
def test_median_interval_uses_the_binomial_order_statistics(n, k):
    # the interval [x_(k), x_(n+1-k)] covers the median with probability 1 - 2 P(Binomial(n, 1/2) <= k - 1);
    # k is the largest with coverage >= 95%: n=6 -> 1 - 2/64; n=10 -> 1 - 2*11/1024; n=20 -> 1 - 2*P(B<=5)
    from math import comb

    values = [float(v) for v in range(n, 0, -1)]  # n, ..., 1 (order must not matter)
    low, high, coverage = median_interval(values)
    tail = sum(comb(n, i) for i in range(k)) / 2**n
    assert (low, high) == (float(k), float(n + 1 - k))
    assert coverage == pytest.approx(1 - 2 * tail)
    assert coverage >= 0.95
    assert 1 - 2 * (tail + comb(n, k) / 2**n) < 0.95  # one step narrower would fall below 95%


def test_median_interval_with_few_values_is_the_range():
    low, high, coverage = median_interval([3.0, 1.0, 2.0])
    assert (low, high) == (1.0, 3.0) and coverage == pytest.approx(1 - 2 / 8)


def test_bench_times_a_representative_handful_unless_asked_for_all():
    from typer.testing import CliRunner

    from sdesbench.cli import app
    from sdesbench.measure.bench import DEFAULT_METHODS, bench_methods
    from sdesbench.methods import METHODS

    assert bench_methods(None) == list(DEFAULT_METHODS) and DEFAULT_METHODS[0] == "student"
    assert bench_methods(["all"]) == ["student"] + [m for m in METHODS.names() if m != "student"]
    assert bench_methods(["sdes", "kl"]) == ["student", "sdes", "kl"]
    help_text = " ".join(CliRunner().invoke(app, ["bench", "--help"], terminal_width=400).output.split())
    assert "`all` for every registered one" in help_text and ", ".join(DEFAULT_METHODS) in help_text, help_text
