"""`camvid`: CamVid in the 11-class, 360x480 version distributed with SegNet.

Layout (root = the folder holding these):
    train/ trainannot/ val/ valannot/ test/ testannot/     images and label PNGs of the same name
    train.txt val.txt test.txt                              optional lists, "IMAGE LABEL" per line
The lists hold absolute paths from the SegNet authors' machine; only the file names are used.
Without a list, every image in the split folder is a sample. Labels are class indices 0..10;
11 is void and maps to the ignore index (255 is accepted as already ignored).
"""
from __future__ import annotations

from pathlib import Path

from sdesbench import IGNORE_INDEX
from sdesbench.data.files import FileSegDataset, build_lut, file_name, pair_by_key, stems
from sdesbench.data.base import DATASETS

CLASS_NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
               "Pedestrian", "Bicyclist"]
PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
VOID = 11
LUT = build_lut({i: i for i in range(len(CLASS_NAMES))})  # 11 (void) and everything else -> 255
KNOWN = frozenset(range(VOID + 1)) | {IGNORE_INDEX}


@DATASETS.register("camvid")
class CamVid(FileSegDataset):
    """`camvid`: 367 train / 101 val / 233 test images, 11 classes, void ignored."""

    name = "camvid"
    num_classes = 11
    class_names = CLASS_NAMES
    palette = PALETTE
    splits = ("train", "val", "test")

    @classmethod
    def split_present(cls, root: Path, split: str) -> bool:
        return (root / split).is_dir() or (root / f"{split}.txt").is_file()

    def _scan(self):
        image_dir, label_dir = self.root / self.split, self.root / f"{self.split}annot"
        images, labels = stems(image_dir, ""), stems(label_dir, "")
        list_file = self.root / f"{self.split}.txt"
        listed = None
        if list_file.is_file():
            # "/SegNet/CamVid/train/X.png /SegNet/CamVid/trainannot/X.png": the label has the image's name
            listed = [file_name(line.split()[0]) for line in list_file.read_text().splitlines() if line.strip()]
        return pair_by_key(images, labels, lambda k: image_dir / k, lambda k: label_dir / k, listed, list_file)

    def label_spec(self, label_path):
        return LUT, KNOWN
