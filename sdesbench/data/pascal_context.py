"""`pascal_context59`: PASCAL-Context, the 59 most frequent classes, on the VOC 2010 images.

Layout (root = VOC2010 itself, or a folder holding VOCdevkit/VOC2010), as mmsegmentation's
converter leaves it (tools/dataset_converters/pascal_context.py, from the VOC 2010 trainval
release and the Detail API's trainval_merged.json):
    JPEGImages/<id>.jpg
    SegmentationClassContext/<id>.png              0 = background, 1..59 = the classes below
    ImageSets/SegmentationContext/{train,val}.txt  one id a line (4,998 / 5,105 images)
Only listed ids are samples and checked: JPEGImages holds the other VOC 2010 images too.

Background (0: unlabelled pixels and the 400 rarer classes) is ignored and class k (1..59) becomes
train id k - 1: mmsegmentation's `reduce_zero_label`, which its PascalContextDataset59 sets (and
its pascal_context_59 dataset config repeats in LoadAnnotations). 255, not written by the converter,
stays ignored. The converter numbers the 59 classes in the sorted order of their Detail ids; the
names in that order, and the palette (sdesbench/data/classes/pascal_context59.csv), are
mmsegmentation's PascalContextDataset59
(open-mmlab/mmsegmentation, commit a5acc11c92bb6878f12345886378473f2c0fa1da,
mmseg/datasets/pascal_context.py; converter: commit 2b6a1aafbf40c8cf2501743e9d6fd9e611e2889d; both
the same in the 1.2.2 release). That palette is colours 1..59 of mmsegmentation's ADE20K palette.
"""
from __future__ import annotations

from pathlib import Path, PurePath

import torch

from sdesbench.data.base import DATASETS
from sdesbench.data.files import (FileSegDataset, class_table, file_name, pair_by_key, reduce_zero_label,
                                  release_folder, stems)
from sdesbench.errors import DataError

CLASS_NAMES, PALETTE = class_table("pascal_context59.csv")  # train id, name, colour per class
LUT, KNOWN = reduce_zero_label(len(CLASS_NAMES))  # 0 (background) and 255 ignored, k -> k - 1
LIST_DIR = "ImageSets/SegmentationContext"
LABEL_DIR = "SegmentationClassContext"
VOC2010 = "VOCdevkit/VOC2010"  # the root may be VOC2010 itself or the folder holding VOCdevkit/


@DATASETS.register("pascal_context59")
class PascalContext59(FileSegDataset):
    """`pascal_context59`: 4,998 train / 5,105 val images, 59 classes, background ignored."""

    num_classes = 59
    class_names = CLASS_NAMES
    palette = PALETTE
    splits = ("train", "val")
    release_sizes = {"train": 4998, "val": 5105}  # the lists mmsegmentation's converter writes

    @classmethod
    def split_present(cls, root: Path, split: str) -> bool:
        return (release_folder(root, VOC2010, "JPEGImages") / LIST_DIR / f"{split}.txt").is_file()

    def _scan(self):
        base = release_folder(self.root, VOC2010, "JPEGImages")
        lst = base / LIST_DIR / f"{self.split}.txt"
        if not lst.is_file():
            raise DataError(f"pascal_context59: no list file for split {self.split!r}: {lst} (written by "
                            "mmsegmentation's tools/dataset_converters/pascal_context.py)")
        ids = [PurePath(file_name(line.split()[0])).stem for line in lst.read_text().splitlines() if line.strip()]
        image_dir, label_dir = base / "JPEGImages", base / LABEL_DIR
        return pair_by_key(stems(image_dir, ".jpg"), stems(label_dir, ".png"), lambda k: image_dir / f"{k}.jpg",
                           lambda k: label_dir / f"{k}.png", ids, lst, report_unlisted=False)

    def source(self) -> str:
        return str(release_folder(self.root, VOC2010, "JPEGImages") / LIST_DIR / f"{self.split}.txt")

    def label_spec(self, label_path):
        return LUT, KNOWN

    def prediction_values(self, train_ids: torch.Tensor) -> torch.Tensor:
        """Class ids 1..59, the values of the converted labels (SegmentationClassContext, 0 = background): train
        id + 1, as mmsegmentation's `IoUMetric(format_only=True)` writes for its `reduce_zero_label`
        PascalContextDataset59 (mmseg/evaluation/metrics/iou_metric.py at 3d50cc3c5be3). PASCAL-Context has no
        test server; this is the form mmsegmentation's own export and the dataset's labels share."""
        return (train_ids.long() + 1).to(torch.uint8)
