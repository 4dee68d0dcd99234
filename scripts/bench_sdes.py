"""Training-step time and peak memory of SDES relative to the plain student (a benchmark, not a test).

Each configuration runs in its own process (so peak-memory high-water marks do not mix), the
configurations alternate over `--repeats` rounds (so load drift on a shared machine hits all of
them alike), and the medians are reported with ratios to `student`.

Time: median of one training step (forward, method loss terms, backward, SGD step) over
`--steps` steps after `--warmup` steps, on random images and labels. On CPU the ratio uses the
process's CPU time (time.process_time; with OMP_NUM_THREADS=1 that is the work done, robust to
other jobs sharing the cores); wall time is printed too. On CUDA it uses synchronised wall time.
Memory: CUDA: torch.cuda.max_memory_allocated over the measured steps (parameters, gradients,
optimizer state, activations). CPU: the same quantity for torch's CPU allocator, read from the
memory timeline of torch.profiler (profile_memory + record_shapes + with_stack) over one more
step: `rise_mb` is the rise of live tensor memory above the step's start (activations,
gradients, temporaries), `peak_mb` = rise + the live state at the start (parameters, momentum
buffers, the batch), the analogue of CUDA's number. The process's ru_maxrss rise is
printed too, but glibc's heap keeps freed blocks, so it over-counts transient tensors.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/bench_sdes.py --batch 4 --crop 128
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "student": ("student", {}),
    "sdes": ("sdes", {}),  # light experts, N=4 (the Cityscapes setting)
    "sdes-no-dfed": ("sdes-no-dfed", {}),
    "sdes-no-dped": ("sdes-no-dped", {}),
    "sdes-student-experts-n2": ("sdes", {"expert": "student", "n_experts": 2, "tau": 5.0}),  # CamVid setting
}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> dict:
    import torch

    from sdesbench.methods.base import MethodContext, StepInfo
    from sdesbench.models import build_model
    from sdesbench.registry import METHODS

    torch.manual_seed(0)
    dev = torch.device(args.device)
    method_name, options = CONFIGS[args.worker]
    model = build_model(args.model, args.classes)
    cls = METHODS.get(method_name)
    opts = cls.parse_options(options, args.classes)
    # a long-tailed class distribution, most frequent first (the split only matters for grouping)
    counts = torch.tensor([int(1e6 / (1 + c)) for c in range(args.classes)])
    method = cls(opts, MethodContext(model=model, num_classes=args.classes, total_iters=10**6,
                                     class_pixel_counts=lambda: counts))
    model.to(dev).train()
    method.to(dev).train()
    params = [p for p in list(model.parameters()) + list(method.parameters())]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.crop, args.crop, generator=g).to(dev)
    labels = torch.randint(0, args.classes, (args.batch, args.crop, args.crop), generator=g)
    labels[:, : args.crop // 8] = 255
    labels = labels.to(dev)

    def step(i: int) -> None:
        terms = method.loss_terms(model(images), labels, StepInfo(i, 10**6))
        opt.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        opt.step()

    base = rss_mb()
    for i in range(args.warmup):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    maxrss_rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        rise = float("nan")
    else:
        _, rise = cpu_allocator_peak_mb(lambda: step(args.steps))
        # the profiler's starting level includes blocks of unknown size; count the live state exactly
        state = list(params) + [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
        persistent = sum(t.numel() * t.element_size() for t in state + [images, labels]) / 2**20
        peak = persistent + rise
    step_s = statistics.median(times if dev.type == "cuda" else cpu_times)
    return {"step_s": step_s, "wall_s": statistics.median(times), "peak_mb": peak, "rise_mb": rise, "maxrss_rise_mb": maxrss_rise,
            "extra_params": sum(p.numel() for p in method.parameters())}


def cpu_allocator_peak_mb(step) -> tuple[float, float]:
    """(peak live CPU tensor memory, its rise above the start) over one call of `step`."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline  # private, but the only CPU timeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(s) for s in sizes]
    return max(totals) / 2**20, (max(totals) - totals[0]) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deeplabv3_resnet18")
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names:
            cmd = [sys.executable, __file__, "--worker", n] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "configs", "repeats")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[n].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {n}: {runs[n][-1]}", file=sys.stderr)
    keys = ("step_s", "wall_s", "peak_mb", "rise_mb", "maxrss_rise_mb")
    med = {n: {k: statistics.median(x[k] for x in v) for k in keys} | {"extra_params": v[0]["extra_params"]}
           for n, v in runs.items()}
    ref = med["student"]
    print(f"{args.model}, {args.classes} classes, batch {args.batch}, crop {args.crop}, device {args.device}, "
          f"median of {args.repeats} processes x {args.steps} steps (after {args.warmup} warm-up)")
    print("| config | step (s) | time ratio | wall (s) | peak (MB) | memory ratio | step rise (MB) | rise ratio "
          "| maxrss rise (MB) | extra params |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, m in med.items():
        print(f"| {n} | {m['step_s']:.3f} | {m['step_s'] / ref['step_s']:.3f} | {m['wall_s']:.3f} | {m['peak_mb']:.0f} | "
              f"{m['peak_mb'] / ref['peak_mb']:.3f} | {m['rise_mb']:.0f} | {m['rise_mb'] / ref['rise_mb']:.3f} | "
              f"{m['maxrss_rise_mb']:.0f} | {m['extra_params']} |")


if __name__ == "__main__":
    main()
