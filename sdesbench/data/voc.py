"""`voc`: Pascal VOC 2012 segmentation, with the SBD augmentation (`trainaug`, 10,582 images).

Layout (root = VOC2012 itself, or a folder holding VOCdevkit/VOC2012):
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png        VOC's own labels (palette PNGs, read as their index values),
                                      with 255 on object boundaries and "difficult" regions
    SegmentationClassAug/<id>.png     SBD's labels converted to grey PNGs (no boundary band)

Splits, each from the first list file found (paths under the VOC2012 folder):
    train     ImageSets/Segmentation/train.txt (VOC 2012's own, 1,464 ids)
    trainaug  the 10,582 ids of VOC train + SBD train + SBD val minus VOC val, in any of the names
              the common tools write:
                ImageSets/Segmentation/trainaug.txt         mmsegmentation's voc_aug.py
                ImageSets/Segmentation/train_aug.txt        DeepLab's list, where most guides put it
                ImageSets/SegmentationAug/train_aug.txt     kazuto1011/deeplab-pytorch's layout
                train_aug.txt, list/voc/train_aug.txt       CIRKD keeps its copy in dataset/list/voc/
              else ImageSets/Segmentation/train.txt followed by ImageSets/Segmentation/aug.txt
              (mmsegmentation's aug.txt is the 9,118 SBD ids outside VOC train and val; its
              pascal_voc12_aug.py config trains on the two lists together)
    val       ImageSets/Segmentation/val.txt (1,449 ids), ImageSets/SegmentationAug/val.txt, val.txt,
              list/voc/val.txt
A split whose list is missing is an error naming every file looked for: `train` never stands in for
`trainaug` (the paper preset of Table 1 asks for `trainaug`). A list line is an id ("2007_000032") or,
as in DeepLab's lists, "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"; the id is taken from
the first column (the label column is not read: the folder comes from the split, below).

Which label file an id reads (`LABEL_DIRS`), where both folders hold it:
    val       SegmentationClass only: the original annotations with their 255 boundary band, as
              mmsegmentation's VOC configs and CIRKD's `VOCDataValSet` score it. SBD also labels
              many VOC val images, without the band; scoring those would count boundary pixels.
    trainaug  SegmentationClassAug first (CIRKD's `VOCDataTrainSet` reads it for every id), else
              SegmentationClass (mmsegmentation's converter writes no SBD label for the VOC train
              ids SBD lacks). mmsegmentation itself reads the train.txt ids from SegmentationClass.
    train     SegmentationClass first (VOC as released), else SegmentationClassAug.
255 is ignored. Only listed ids are checked: most JPEGImages have no segmentation label by design.

Sources (read, not copied):
- open-mmlab/mmsegmentation `tools/dataset_converters/voc_aug.py` (commit 3f8d34ee4b43d5cac00f12e911bbedf7544f77a4):
  writes ImageSets/Segmentation/trainaug.txt (asserts 10,582 ids) and aug.txt (10,582 - 1,464 ids) and
  the SBD .mat labels as SegmentationClassAug/<id>.png; `configs/_base_/datasets/pascal_voc12_aug.py`
  (81e5dd7746859ff02b21fd79f41dd736ae6ea39d): train = train.txt on SegmentationClass + aug.txt on
  SegmentationClassAug, val = val.txt on SegmentationClass (also in pascal_voc12.py at 3f8d34ee).
- winycg/CIRKD `dataset/voc.py` (dab64dbb5e4172141166cf8434a80ce55d9d3aa7; unchanged since
  6ca9106bb8828a9897d8d7a48c81d4b661c2d6cd): train lists read SegmentationClassAug, val lists
  SegmentationClass; `dataset/list/voc/train_aug.txt` holds 10,582 bare ids, `val.txt` 1,449.
- kazuto1011/deeplab-pytorch `libs/datasets/voc.py` (3923bf4c083c8cf5891b6e58348dfc385d8b364b) and
  `data/datasets/voc12/README.md`: ImageSets/SegmentationAug/{train_aug,val,...}.txt in DeepLab's
  two-column form.
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
TRAIN_LIST = "ImageSets/Segmentation/train.txt"
LISTS = {  # a split's list files, the first found wins (module docstring)
    "train": (TRAIN_LIST,),
    "trainaug": ("ImageSets/Segmentation/trainaug.txt", "ImageSets/Segmentation/train_aug.txt",
                 "ImageSets/SegmentationAug/train_aug.txt", "train_aug.txt", "list/voc/train_aug.txt"),
    "val": ("ImageSets/Segmentation/val.txt", "ImageSets/SegmentationAug/val.txt", "val.txt", "list/voc/val.txt"),
}
JOINED_LISTS = {"trainaug": (TRAIN_LIST, "ImageSets/Segmentation/aug.txt")}  # read one after the other
LABEL_DIRS = {"train": ("SegmentationClass", "SegmentationClassAug"),
              "trainaug": ("SegmentationClassAug", "SegmentationClass"),
              "val": ("SegmentationClass",)}
STANDARD_IDS = {"train": 1464, "trainaug": 10582, "val": 1449}  # ids in the standard lists


def voc_base(root: Path) -> Path:
    nested = root / "VOCdevkit" / "VOC2012"
    return nested if nested.is_dir() and not (root / "JPEGImages").is_dir() else root


def list_files(root: Path, split: str) -> list[Path] | None:
    """The list file(s) split `split` reads, or None when none is there."""
    base = voc_base(root)
    found = next((base / rel for rel in LISTS[split] if (base / rel).is_file()), None)
    if found is not None:
        return [found]
    joined = [base / rel for rel in JOINED_LISTS.get(split, ())]
    return joined if joined and all(p.is_file() for p in joined) else None


def looked_for(split: str) -> str:
    joined = JOINED_LISTS.get(split)
    return ", ".join(LISTS[split]) + (f", or {' followed by '.join(joined)}" if joined else "")


def read_ids(lst: Path) -> list[str]:
    return [PurePath(file_name(line.split()[0])).stem for line in lst.read_text().splitlines() if line.strip()]


@DATASETS.register("voc")
class PascalVOC(FileSegDataset):
    """`voc`: 1,464 train / 10,582 trainaug (with SBD) / 1,449 val images, 21 classes (background + 20)."""

    num_classes = 21
    class_names = CLASS_NAMES
    palette = PALETTE
    splits = ("train", "trainaug", "val")
    paper_splits = ("trainaug",)  # Table 1 trains on it

    @classmethod
    def split_present(cls, root: Path, split: str) -> bool:
        return list_files(root, split) is not None

    def _scan(self):
        base = voc_base(self.root)
        self.lists = list_files(self.root, self.split)
        if self.lists is None:
            what = f" (the {STANDARD_IDS['trainaug']:,} SBD-augmented training ids)" if self.split == "trainaug" else ""
            raise DataError(f"voc: no list file for split {self.split!r}{what} under {base}; looked for "
                            f"{looked_for(self.split)}")
        self.listed = [i for lst in self.lists for i in read_ids(lst)]
        image_dir = base / "JPEGImages"
        label_dirs = [base / d for d in LABEL_DIRS[self.split]]
        labels: dict[str, Path] = {}
        for folder in reversed(label_dirs):  # the first folder of the split's order wins
            labels |= stems(folder, ".png")
        return pair_by_key(stems(image_dir, ".jpg"), labels, lambda k: image_dir / f"{k}.jpg",
                           lambda k: label_dirs[0] / f"{k}.png", self.listed, " + ".join(map(str, self.lists)),
                           report_unlisted=False)

    def source(self) -> str:
        return " + ".join(map(str, self.lists))

    def split_warnings(self) -> list[str]:
        n, standard = len(self.listed), STANDARD_IDS[self.split]
        if n == standard:
            return []
        which = "the standard" if self.split == "trainaug" else "VOC 2012's standard"
        return [f"{self.source()}: {n:,} id(s); {which} {self.split} list holds {standard:,}"]

    def label_spec(self, label_path):
        return LUT, KNOWN
