"""Dataset checks: run by `sdesbench data check` and before training (cached by fingerprint).

Every sample is decoded once (in a thread pool: the decoders release the GIL) and each problem is
reported as one line naming the file: images without labels and labels without images (the
dataset's `orphans()`), unreadable, corrupt or truncated files, image/label size mismatches and raw
label values outside the dataset's known set. The same pass counts pixels per class.

Class pixel shares are fractions of the *labelled* pixels of a split (ignored/void pixels are
excluded), so they sum to 1 and match the class statistics SDES uses for its class split.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sdesbench import IGNORE_INDEX
from sdesbench.data.base import DATASETS, SegDataset, mask_class_counts, resolve_root, save_class_pixel_counts, stats_cache_path
from sdesbench.data.files import FileSegDataset, describe_values, read_image, read_label
from sdesbench.io import write_json
from sdesbench.errors import DataError

Inspection = tuple[list[str], torch.Tensor]  # (problem lines, per-class pixel counts)


def inspect_file_sample(ds: FileSegDataset, index: int) -> Inspection:
    """Decode one image/label pair of a dataset on disk and report everything wrong with it."""
    image_path, label_path = ds.pairs[index]
    counts = torch.zeros(ds.num_classes, dtype=torch.int64)
    problems, image, raw = [], None, None
    try:
        image = read_image(image_path)
    except DataError as e:
        problems.append(str(e))
    try:
        raw = read_label(label_path)
    except DataError as e:
        problems.append(str(e))
    if image is None or raw is None:
        return problems, counts
    (h, w), (lh, lw) = image.shape[-2:], raw.shape
    if (h, w) != (lh, lw):
        return [f"{label_path}: size mismatch: label {lw}x{lh}, image {w}x{h} ({image_path.name})"], counts
    lut, known = ds.label_spec(label_path)
    hist = torch.bincount(raw.flatten(), minlength=256)  # pixels per raw value: one pass over the label
    present = hist.nonzero().flatten()
    unknown = [v for v in present.tolist() if v not in known]
    if unknown:
        problems.append(f"{label_path}: label values {', '.join(map(str, unknown))} outside the known set "
                        f"({describe_values(list(known))})")
    mapped = lut[present]
    keep = mapped < ds.num_classes  # drop ignored values
    return problems, counts.index_add_(0, mapped[keep], hist[present][keep])


def inspect_sample(ds: SegDataset, index: int) -> Inspection:
    """Problems of one sample of any dataset (through `load`), and its per-class pixel counts."""
    if isinstance(ds, FileSegDataset):
        return inspect_file_sample(ds, index)
    counts = torch.zeros(ds.num_classes, dtype=torch.int64)
    try:
        image, mask = ds.load(index)
    except Exception as e:
        return [f"{ds.sample_id(index)}: unreadable ({e})"], counts
    if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
        return [f"{ds.sample_id(index)}: image {tuple(image.shape[-2:])} and label {tuple(mask.shape[-2:])} "
                "differ in size"], counts
    bad = mask[(mask != IGNORE_INDEX) & ((mask < 0) | (mask >= ds.num_classes))].unique()
    problems = []
    if bad.numel():
        problems.append(f"{ds.sample_id(index)}: label values {bad.tolist()} outside 0..{ds.num_classes - 1} and "
                        f"{IGNORE_INDEX}")
    return problems, mask_class_counts(mask, ds.num_classes)


def _progress(show: bool) -> Progress:
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not (show and console.is_terminal))


def check_split(ds: SegDataset, progress: Progress | None = None, threads: int | None = None
                ) -> tuple[list[str], torch.Tensor]:
    """Problems found in one split's samples, and its per-class pixel counts (ignored pixels excluded)."""
    threads = threads or min(8, os.cpu_count() or 1)
    task = progress.add_task(f"check {ds.name}/{ds.split}", total=len(ds)) if progress else None
    problems: list[str] = []
    counts = torch.zeros(ds.num_classes, dtype=torch.int64)
    with ThreadPoolExecutor(threads) as pool:
        for found, c in pool.map(lambda i: inspect_sample(ds, i), range(len(ds))):
            problems += found
            counts += c
            if progress:
                progress.advance(task)
    return problems, counts


def split_problems(ds: SegDataset, progress: Progress | None = None) -> tuple[list[str], torch.Tensor]:
    """Everything wrong with one split: orphaned files first, then per-sample problems."""
    orphans = ds.orphans() if hasattr(ds, "orphans") else []
    problems, counts = check_split(ds, progress)
    return orphans + problems, counts


def shares(ds_cls: type[SegDataset], counts: torch.Tensor) -> dict[str, float]:
    total = int(counts.sum())
    return {name: (int(c) / total if total else 0.0) for name, c in zip(ds_cls.class_names, counts)}


def check_dataset(name: str, root: str | Path | None, show_progress: bool = True) -> dict[str, Any]:
    """`sdesbench data check`: {"splits": {split: n}, "class_pixel_share": {split: {class: f}}, "problems": [...]}."""
    ds_cls = DATASETS.get(name)
    root = resolve_root(name, root) if ds_cls.needs_root else None
    report: dict[str, Any] = {"splits": {}, "class_pixel_share": {}, "problems": []}
    problems: list[str] = []
    with _progress(show_progress) as progress:
        for split in ds_cls.splits:
            if issubclass(ds_cls, FileSegDataset) and not ds_cls.split_present(root, split):
                if split in ds_cls.required_splits:
                    problems.append(f"{root}: split {split!r} not found")
                continue
            try:
                ds = ds_cls(root, split)
            except DataError as e:
                problems.append(str(e))
                continue
            found, counts = split_problems(ds, progress)
            problems += found
            report["splits"][split] = len(ds)
            report["class_pixel_share"][split] = shares(ds_cls, counts)
    report["problems"] = list(dict.fromkeys(problems))  # a file shared by two splits is reported once
    return report


def ensure_checked(train: SegDataset, val: SegDataset, cache_dir: Path) -> None:
    """Refuse to start on a dataset that fails its check; a pass is cached by fingerprint, together
    with the split's class pixel counts (the cache `class_pixel_counts` reads)."""
    if getattr(train, "generated", False):
        return
    for ds in (train, val):
        marker = Path(cache_dir) / f"check-{ds.name}-{ds.split}-{ds.fingerprint()}.json"
        if marker.is_file() and json.loads(marker.read_text()).get("ok"):
            continue
        with _progress(True) as progress:
            problems, counts = split_problems(ds, progress)
        if problems:
            more = f" (and {len(problems) - 1} more; run `sdesbench data check {ds.name}`)" if len(problems) > 1 else ""
            raise DataError(f"dataset check failed: {problems[0]}{more}")
        save_class_pixel_counts(stats_cache_path(ds, cache_dir), counts)  # saves SDES a second pass
        write_json(marker, {"ok": True, "samples": len(ds)})
