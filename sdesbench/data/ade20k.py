"""`ade20k`: ADE20K as released for the MIT Scene Parsing challenge (ADEChallengeData2016), 150 classes.

Layout (root = ADEChallengeData2016 itself, or a folder holding it):
    images/training/ADE_train_<n>.jpg        annotations/training/ADE_train_<n>.png      20,210 pairs
    images/validation/ADE_val_<n>.jpg        annotations/validation/ADE_val_<n>.png       2,000 pairs
An image and its label share the file stem; split `train` is `training`, `val` is `validation`.

Labels are grey PNGs holding 0..150. 0 is "other" (pixels of none of the 150 classes) and is
ignored; class k (1..150) becomes train id k - 1. This is mmsegmentation's `reduce_zero_label`,
which its ADE20KDataset fixes to True, and what CIRKD's loader does (label - 1, with -1 ignored).
255 is not written by the release; like `reduce_zero_label`, it stays ignored. Any other value is
reported by `sdesbench data check` (and ignored by `load`).

Class names, their order and the palette (sdesbench/data/classes/ade20k.csv) are mmsegmentation's
ADE20KDataset (open-mmlab/mmsegmentation, commit b05a26e2f3511fd976ad89585717881b91e0afad,
mmseg/datasets/ade.py; the same in the 1.2.2 release), with the trailing space of its "bed " dropped.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sdesbench.data.base import DATASETS
from sdesbench.data.files import FileSegDataset, class_table, pair_by_key, reduce_zero_label, release_folder, stems

CLASS_NAMES, PALETTE = class_table("ade20k.csv")  # train id, name, colour per class
LUT, KNOWN = reduce_zero_label(len(CLASS_NAMES))  # 0 ("other") and 255 ignored, k -> k - 1
FOLDERS = {"train": "training", "val": "validation"}
RELEASE = "ADEChallengeData2016"  # the root may be this folder or the one holding it


@DATASETS.register("ade20k")
class ADE20K(FileSegDataset):
    """`ade20k`: 20,210 train / 2,000 val images, 150 classes, "other" (0) ignored."""

    num_classes = 150
    class_names = CLASS_NAMES
    palette = PALETTE
    splits = ("train", "val")
    release_sizes = {"train": 20210, "val": 2000}

    @classmethod
    def split_present(cls, root: Path, split: str) -> bool:
        return (release_folder(root, RELEASE, "images") / "images" / FOLDERS[split]).is_dir()

    def _scan(self):
        base, folder = release_folder(self.root, RELEASE, "images"), FOLDERS[self.split]
        image_dir, label_dir = base / "images" / folder, base / "annotations" / folder
        return pair_by_key(stems(image_dir, ".jpg"), stems(label_dir, ".png"), lambda k: image_dir / f"{k}.jpg",
                           lambda k: label_dir / f"{k}.png")

    def source(self) -> str:
        return str(release_folder(self.root, RELEASE, "images") / "images" / FOLDERS[self.split])

    def label_spec(self, label_path):
        return LUT, KNOWN

    def prediction_values(self, train_ids: torch.Tensor) -> torch.Tensor:
        """Class ids 1..150, the values of the release's own labels and what the Scene Parsing server reads:
        train id + 1, as mmsegmentation's `IoUMetric(format_only=True)` writes for `reduce_zero_label` datasets
        (mmseg/evaluation/metrics/iou_metric.py at 3d50cc3c5be3: `output_mask + 1`)."""
        return (train_ids.long() + 1).to(torch.uint8)
