"""Dataset checks: run by `sdesbench data check` and before training (cached by fingerprint).

Every sample is decoded once (in a thread pool: the decoders release the GIL) and each problem is
reported as one line naming the file: images without labels and labels without images (the
dataset's `orphans()`), unreadable, corrupt or truncated files, image/label size mismatches and raw
label values outside the dataset's known set. The same pass counts pixels per class. Images that are
not RGB (grey, palette, RGBA) are converted when loaded, as a warning, not a problem: they do not fail
the check. A sample shared by two splits (CamVid's trainval = train + val) is decoded once.

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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sdesbench import IGNORE_INDEX
from sdesbench.console import err
from sdesbench.data.base import (DATASETS, SegDataset, check_root_wanted, mask_class_counts, read_cache_entry,
                                 resolve_root, save_class_pixel_counts, stats_cache_path)
from sdesbench.data.files import FileSegDataset, decode_image, describe_values, read_label
from sdesbench.io import write_json
from sdesbench.errors import DataError

Inspection = tuple[list[str], list[str], torch.Tensor]  # (problem lines, warning lines, per-class pixel counts)
# what converting an image of a PIL mode to RGB does, for the warning line
CONVERSIONS = {"L": "greyscale, its grey level copied to R, G and B", "LA": "greyscale with alpha, alpha dropped",
               "RGBA": "RGB with alpha, alpha dropped", "P": "palette, colours looked up",
               "PA": "palette with alpha, alpha dropped"}


def inspect_file_sample(ds: FileSegDataset, index: int) -> Inspection:
    """Decode one image/label pair of a dataset on disk and report everything wrong with it."""
    image_path, label_path = ds.pairs[index]
    counts = torch.zeros(ds.num_classes, dtype=torch.int64)
    problems, warnings, image, raw = [], [], None, None
    try:
        image, mode = decode_image(image_path)
        if mode != "RGB":
            warnings.append(f"{image_path}: image is mode {mode} ({CONVERSIONS.get(mode, 'not RGB')}); "
                            "converted to RGB when loaded")
    except DataError as e:
        problems.append(str(e))
    try:
        raw = read_label(label_path)
    except DataError as e:
        problems.append(str(e))
    if image is None or raw is None:
        return problems, warnings, counts
    (h, w), (lh, lw) = image.shape[-2:], raw.shape
    if (h, w) != (lh, lw):
        return [f"{label_path}: size mismatch: label {lw}x{lh}, image {w}x{h} ({image_path.name})"], warnings, counts
    lut, known = ds.label_spec(label_path)
    hist = torch.bincount(raw.flatten(), minlength=256)  # pixels per raw value: one pass over the label
    present = hist.nonzero().flatten()
    unknown = [v for v in present.tolist() if v not in known]
    if unknown:
        problems.append(f"{label_path}: label values {', '.join(map(str, unknown))} outside the known set "
                        f"({describe_values(list(known))})")
    mapped = lut[present]
    keep = mapped < ds.num_classes  # drop ignored values
    return problems, warnings, counts.index_add_(0, mapped[keep], hist[present][keep])


def inspect_sample(ds: SegDataset, index: int) -> Inspection:
    """Problems of one sample of any dataset (through `load`), and its per-class pixel counts."""
    if isinstance(ds, FileSegDataset):
        return inspect_file_sample(ds, index)
    counts = torch.zeros(ds.num_classes, dtype=torch.int64)
    try:
        image, mask = ds.load(index)
    except Exception as e:
        return [f"{ds.sample_id(index)}: unreadable ({e})"], [], counts
    if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
        return [f"{ds.sample_id(index)}: image {tuple(image.shape[-2:])} and label {tuple(mask.shape[-2:])} "
                "differ in size"], [], counts
    bad = mask[(mask != IGNORE_INDEX) & ((mask < 0) | (mask >= ds.num_classes))].unique()
    problems = []
    if bad.numel():
        problems.append(f"{ds.sample_id(index)}: label values {bad.tolist()} outside 0..{ds.num_classes - 1} and "
                        f"{IGNORE_INDEX}")
    return problems, [], mask_class_counts(mask, ds.num_classes)


def _progress(show: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, transient=True, disable=not (show and err.is_terminal))


def sample_key(ds: SegDataset, index: int) -> object:
    """What makes two samples the same one across splits: its files, or its generated id."""
    return ds.pairs[index] if isinstance(ds, FileSegDataset) else (ds.name, ds.split, ds.sample_id(index))


def check_split(ds: SegDataset, progress: Progress | None = None, threads: int | None = None,
                inspected: dict[object, Inspection] | None = None) -> Inspection:
    """Problems and warnings found in one split's samples, and its per-class pixel counts (ignored
    pixels excluded). `inspected` carries results between splits: a shared sample is decoded once."""
    threads = threads or min(8, os.cpu_count() or 1)
    inspected = {} if inspected is None else inspected
    todo = [i for i in range(len(ds)) if sample_key(ds, i) not in inspected]
    task = progress.add_task(f"check {ds.name}/{ds.split}", total=len(todo)) if progress else None
    with ThreadPoolExecutor(threads) as pool:
        for i, result in zip(todo, pool.map(lambda i: inspect_sample(ds, i), todo)):
            inspected[sample_key(ds, i)] = result
            if progress:
                progress.advance(task)
    problems: list[str] = []
    warnings: list[str] = []
    counts = torch.zeros(ds.num_classes, dtype=torch.int64)
    for i in range(len(ds)):
        found, warned, c = inspected[sample_key(ds, i)]
        problems += found
        warnings += warned
        counts += c
    return problems, warnings, counts


def split_problems(ds: SegDataset, progress: Progress | None = None,
                   inspected: dict[object, Inspection] | None = None) -> Inspection:
    """Everything wrong with one split (orphaned files first, then per-sample problems), its warnings
    and its per-class pixel counts."""
    orphans = ds.orphans() if hasattr(ds, "orphans") else []
    problems, warnings, counts = check_split(ds, progress, inspected=inspected)
    return orphans + problems, warnings, counts


def shares(ds_cls: type[SegDataset], counts: torch.Tensor) -> dict[str, float]:
    total = int(counts.sum())
    return {name: (int(c) / total if total else 0.0) for name, c in zip(ds_cls.class_names, counts)}


def check_dataset(name: str, root: str | Path | None, show_progress: bool = True) -> dict[str, Any]:
    """`sdesbench data check`: {"splits": {split: n}, "sources": {split: list file or folder},
    "class_pixel_share": {split: {class: f}}, "problems": [...], "warnings": [...]}."""
    ds_cls = DATASETS.get(name)
    check_root_wanted(ds_cls, root)
    root = resolve_root(name, root) if ds_cls.needs_root else None
    report: dict[str, Any] = {"splits": {}, "sources": {}, "class_pixel_share": {}, "problems": [], "warnings": []}
    problems: list[str] = []
    warnings: list[str] = []
    inspected: dict[object, Inspection] = {}
    with _progress(show_progress) as progress:
        for split in ds_cls.splits:
            if issubclass(ds_cls, FileSegDataset) and not ds_cls.split_present(root, split):
                if split in ds_cls.required_splits:
                    problems.append(f"{root}: split {split!r} not found")
                elif split in ds_cls.paper_splits:
                    warnings.append(absent_split(ds_cls, root, split))
                continue
            try:
                ds = ds_cls(root, split)
            except DataError as e:
                problems.append(str(e))
                continue
            found, warned, counts = split_problems(ds, progress, inspected)
            problems += found
            warnings += ds.split_warnings() + warned
            report["splits"][split] = len(ds)
            report["sources"][split] = ds.source()
            report["class_pixel_share"][split] = shares(ds_cls, counts)
    report["problems"] = list(dict.fromkeys(problems))  # a file shared by two splits is reported once
    report["warnings"] = list(dict.fromkeys(warnings))
    return report


def absent_split(ds_cls: type[FileSegDataset], root: Path, split: str) -> str:
    """The warning for an absent split a paper protocol needs: the dataset's own error (what it looked for)."""
    try:
        ds_cls(root, split)
    except DataError as e:
        return f"{e} (a paper protocol trains or evaluates on it)"
    return f"{root}: split {split!r} not found (a paper protocol trains or evaluates on it)"


def check_marker_path(ds: SegDataset, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"check-{ds.name}-{ds.split}-{ds.fingerprint()}.json"


def ensure_checked(train: SegDataset, val: SegDataset, cache_dir: Path) -> None:
    """Refuse to start on a dataset that fails its check; a pass is cached by fingerprint, together
    with the split's class pixel counts (the cache `class_pixel_counts` reads). An unreadable marker
    is a miss: the split is checked again and the marker rewritten."""
    if getattr(train, "generated", False):
        return
    for ds in (train, val):
        marker = check_marker_path(ds, cache_dir)
        cached = read_cache_entry(marker, lambda p: json.loads(p.read_text()), lambda d: isinstance(d, dict))
        if cached is not None and cached.get("ok"):
            continue
        with _progress(True) as progress:
            problems, _, counts = split_problems(ds, progress)
        if problems:
            more = f" (and {len(problems) - 1} more; run `sdesbench data check {ds.name}`)" if len(problems) > 1 else ""
            raise DataError(f"dataset check failed: {problems[0]}{more}")
        save_class_pixel_counts(stats_cache_path(ds, cache_dir), counts)  # saves SDES a second pass
        write_json(marker, {"ok": True, "samples": len(ds)})
