"""`sdesbench data check|stats|throughput`: validate a dataset folder, count class pixels, time loading."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from sdesbench.console import out

data_app = typer.Typer(no_args_is_help=True, help="Check dataset folders and compute class statistics.")


def stats_cache_dir() -> Path:
    """$SDESBENCH_CACHE, else $XDG_CACHE_HOME/sdesbench (~/.cache/sdesbench)."""
    env = os.environ.get("SDESBENCH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdesbench"


@data_app.command("check")
def check(
    dataset: str = typer.Argument(..., help="Dataset name (see `sdesbench list datasets`)."),
    root: Optional[Path] = typer.Option(None, help="Dataset folder (default: $SDESBENCH_DATA/<dataset>)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
):
    """Validate a dataset folder: counts per split, orphaned, unreadable or truncated files, size
    mismatches, label values outside the known set, and per-class pixel shares (of labelled pixels).
    Exits non-zero with one line per problem on stderr when anything is wrong. Images that are not RGB
    (grey, RGBA, ...) are converted on load: one `warning:` line each on stderr, exit status unchanged."""
    from sdesbench.data.check import check_dataset

    report = check_dataset(dataset, root, show_progress=progress)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    for line in report["problems"]:
        print(line, file=sys.stderr)
    for line in report["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    if report["problems"]:
        raise typer.Exit(1)


def _print_report(report: dict) -> None:
    splits = list(report["splits"])
    for s, n in report["splits"].items():  # which list file (or folder) each split came from
        out.print(f"{s}: {n} images from {report['sources'][s]}", soft_wrap=True, highlight=False)
    if not splits:
        out.print("no splits found")
    if splits:
        t = Table(title="pixel share %", caption="of labelled pixels (void excluded)")
        t.add_column("class")
        for s in splits:
            t.add_column(s, justify="right")
        for name in report["class_pixel_share"][splits[0]]:
            t.add_row(name, *(f"{100 * report['class_pixel_share'][s][name]:.2f}" for s in splits))
        out.print(t)
    n, w = len(report["problems"]), len(report["warnings"])
    warned = f", {w} warning(s)" if w else ""
    out.print(f"{n} problem(s){warned} found (listed on stderr)" if n or w else "no problems found")


@data_app.command("stats")
def stats(
    dataset: str = typer.Argument(..., help="Dataset name."),
    root: Optional[Path] = typer.Option(None, help="Dataset folder (default: $SDESBENCH_DATA/<dataset>)."),
    split: str = typer.Option("train", help="Split to count."),
    as_json: bool = typer.Option(False, "--json", help="Print {class: pixels} as JSON."),
):
    """Per-class pixel counts over a split (ignored pixels excluded), cached by the file list's
    fingerprint in $SDESBENCH_CACHE (default ~/.cache/sdesbench). SDES uses them for its class split."""
    from sdesbench.data import DATASETS
    from sdesbench.data.base import class_pixel_counts

    ds = DATASETS.get(dataset)(root, split)
    counts = class_pixel_counts(ds, stats_cache_dir())
    total = int(counts.sum())
    if as_json:
        print(json.dumps({name: int(c) for name, c in zip(ds.class_names, counts)}, indent=2))
        return
    t = Table(title=f"{dataset}/{split}: {len(ds)} images, {total} labelled pixels")
    for col in ("id", "class", "pixels", "share %"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for i, (name, c) in enumerate(zip(ds.class_names, counts.tolist())):
        t.add_row(str(i), name, str(c), f"{100 * c / total:.2f}" if total else "-")
    out.print(t)


@data_app.command("throughput")
def throughput(
    dataset: str = typer.Argument(..., help="Dataset name."),
    root: Optional[Path] = typer.Option(None, help="Dataset folder (default: $SDESBENCH_DATA/<dataset>)."),
    crop: int = typer.Option(512, help="Square training crop."),
    images: int = typer.Option(64, "-n", help="Augmented crops to time."),
    workers: int = typer.Option(0, help="0: time one worker in this process; k: a DataLoader with k workers."),
    split: str = typer.Option("train", help="Split to read."),
):
    """Decode + augment throughput (random scale 0.5-2, crop padded with 255, flip, normalise) in images/s."""
    import platform

    from sdesbench.data import DATASETS
    from sdesbench.measure.throughput import loader_throughput

    ds = DATASETS.get(dataset)(root, split)
    r = loader_throughput(ds, (crop, crop), images, workers=workers)
    cpu = f", {r['per_cpu_s']:.1f} per CPU-second" if "per_cpu_s" in r else ""
    out.print(f"{dataset}/{split}, {crop}x{crop} crops, {r['images']} images in {r['seconds']:.1f} s: "
              f"{r['images_per_s']:.1f} images/s, {r['per_worker']:.1f} per worker{cpu} "
              f"({max(workers, 1)} worker(s); {platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f})")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
