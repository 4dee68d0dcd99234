"""Dataset checks run before training (cached by the file list's fingerprint).

`check_split` loads every sample once and reports problems as one line each, naming the file:
unreadable files, image/label size mismatches and label values outside the known set.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sdesbench import IGNORE_INDEX
from sdesbench.data.base import SegDataset
from sdesbench.engine.io import write_json
from sdesbench.errors import DataError


def check_split(ds: SegDataset) -> tuple[list[str], torch.Tensor]:
    """Problems found in one split, and its per-class pixel counts (ignored pixels excluded)."""
    problems: list[str] = []
    counts = torch.zeros(ds.num_classes, dtype=torch.int64)
    for i in range(len(ds)):
        try:
            image, mask = ds.load(i)
        except Exception as e:
            problems.append(f"{ds.sample_id(i)}: unreadable ({e})")
            continue
        if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
            problems.append(f"{ds.sample_id(i)}: image {tuple(image.shape[-2:])} and label {tuple(mask.shape[-2:])} "
                            "differ in size")
            continue
        bad = mask[(mask != IGNORE_INDEX) & ((mask < 0) | (mask >= ds.num_classes))].unique()
        if bad.numel():
            problems.append(f"{ds.sample_id(i)}: label values {bad.tolist()} outside 0..{ds.num_classes - 1} and "
                            f"{IGNORE_INDEX}")
        valid = mask[(mask != IGNORE_INDEX) & (mask >= 0) & (mask < ds.num_classes)]
        counts += torch.bincount(valid.flatten().long(), minlength=ds.num_classes)
    return problems, counts


def ensure_checked(train: SegDataset, val: SegDataset, cache_dir: Path) -> None:
    """Refuse to start on a dataset that fails its check; a pass is cached by fingerprint."""
    if getattr(train, "generated", False):
        return
    for ds in (train, val):
        marker = Path(cache_dir) / f"check-{ds.name}-{ds.split}-{ds.fingerprint()}.json"
        if marker.is_file() and json.loads(marker.read_text()).get("ok"):
            continue
        problems, _ = check_split(ds)
        if problems:
            more = f" (and {len(problems) - 1} more; run `sdesbench data check {ds.name}`)" if len(problems) > 1 else ""
            raise DataError(f"dataset check failed: {problems[0]}{more}")
        write_json(marker, {"ok": True, "samples": len(ds)})
