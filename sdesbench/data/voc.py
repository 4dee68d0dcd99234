"""`voc`: Pascal VOC 2012 segmentation with the SBD augmentation (train_aug, 10,582 images).

Layout (root = VOC2012 itself, or a folder holding VOCdevkit/VOC2012):
    JPEGImages/<id>.jpg
    SegmentationClassAug/<id>.png     SBD-augmented labels (grey values), used where present, else
    SegmentationClass/<id>.png        the original palette PNGs, read as their index values
    list files, the first found of:
      train: ImageSets/Segmentation/train_aug.txt, ImageSets/SegmentationAug/train_aug.txt,
             train_aug.txt, then (no SBD) ImageSets/Segmentation/train.txt (1,464 ids)
      val:   ImageSets/Segmentation/val.txt (1,449 ids), ImageSets/SegmentationAug/val.txt, val.txt
A list line is an id ("2007_000032") or, as in DeepLab's lists, "/JPEGImages/<id>.jpg
/SegmentationClassAug/<id>.png"; the id is taken from the first entry. 255 (object boundaries) is
ignored. Only listed ids are checked: most JPEGImages have no segmentation label by design.
"""
from __future__ import annotations

from pathlib import Path, PurePath

from sdesbench import IGNORE_INDEX
from sdesbench.data.files import FileSegDataset, build_lut, file_name, pair_by_key, stems
from sdesbench.errors import DataError
from sdesbench.data.base import DATASETS

CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]


def voc_palette(n: int = 256) -> list[tuple[int, int, int]]:
    """The VOC colour map: the bits of the class index spread over R, G and B, high bits first."""
    palette = []
    for i in range(n):
        rgb, c = [0, 0, 0], i
        for shift in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << shift
            c >>= 3
        palette.append(tuple(rgb))
    return palette


PALETTE = voc_palette(len(CLASS_NAMES))
LUT = build_lut({i: i for i in range(len(CLASS_NAMES))})
KNOWN = frozenset(range(len(CLASS_NAMES))) | {IGNORE_INDEX}
LISTS = {
    "train": ["ImageSets/Segmentation/train_aug.txt", "ImageSets/SegmentationAug/train_aug.txt", "train_aug.txt",
              "ImageSets/Segmentation/train.txt"],
    "val": ["ImageSets/Segmentation/val.txt", "ImageSets/SegmentationAug/val.txt", "val.txt"],
}


def voc_base(root: Path) -> Path:
    nested = root / "VOCdevkit" / "VOC2012"
    return nested if nested.is_dir() and not (root / "JPEGImages").is_dir() else root


def list_file(root: Path, split: str) -> Path | None:
    base = voc_base(root)
    return next((base / rel for rel in LISTS[split] if (base / rel).is_file()), None)


@DATASETS.register("voc")
class PascalVOC(FileSegDataset):
    """`voc`: 10,582 train_aug / 1,449 val images, 21 classes (background + 20 objects)."""

    name = "voc"
    num_classes = 21
    class_names = CLASS_NAMES
    palette = PALETTE
    splits = ("train", "val")

    @classmethod
    def split_present(cls, root: Path, split: str) -> bool:
        return list_file(root, split) is not None

    def _scan(self):
        base = voc_base(self.root)
        lst = list_file(self.root, self.split)
        if lst is None:
            raise DataError(f"voc: no list file for split {self.split!r} under {base} "
                            f"(looked for {', '.join(LISTS[self.split])})")
        ids = [PurePath(file_name(line.split()[0])).stem for line in lst.read_text().splitlines() if line.strip()]
        image_dir = base / "JPEGImages"
        aug_dir, plain_dir = base / "SegmentationClassAug", base / "SegmentationClass"
        labels = stems(plain_dir, ".png") | stems(aug_dir, ".png")  # the SBD-augmented label wins
        label_dir = aug_dir if aug_dir.is_dir() else plain_dir
        return pair_by_key(stems(image_dir, ".jpg"), labels, lambda k: image_dir / f"{k}.jpg",
                           lambda k: label_dir / f"{k}.png", ids, lst, report_unlisted=False)

    def label_spec(self, label_path):
        return LUT, KNOWN
