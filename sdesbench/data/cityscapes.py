"""`cityscapes`: Cityscapes fine annotations, 19 evaluation classes.

Layout (root = the folder holding leftImg8bit/ and gtFine/):
    leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<stem>_gtFine_labelTrainIds.png   used where present, else
    gtFine/{train,val,test}/<city>/<stem>_gtFine_labelIds.png        mapped to the 19 train ids
The labelIds -> train id table is the one of cityscapesScripts (helpers/labels.py); every other
id (unlabeled, ego vehicle, ..., caravan, trailer, license plate) is ignored (255).
"""
from __future__ import annotations

from pathlib import Path

from sdesbench import IGNORE_INDEX
from sdesbench.data.files import FileSegDataset, build_lut, pair_by_key, stems
from sdesbench.data.base import DATASETS

CLASS_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle"]
PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
           (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
           (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]
# labelIds of the 19 evaluated classes, in train id order (cityscapesScripts labels.py)
EVAL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
ID_LUT = build_lut({label_id: train_id for train_id, label_id in enumerate(EVAL_IDS)})
ID_KNOWN = frozenset(range(34)) | {IGNORE_INDEX}  # ids 0..33; license plate (-1) is stored as 255
TRAIN_ID_LUT = build_lut({i: i for i in range(len(CLASS_NAMES))})
TRAIN_ID_KNOWN = frozenset(range(len(CLASS_NAMES))) | {IGNORE_INDEX}
IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
IDS_SUFFIX = "_gtFine_labelIds.png"


def _by_city(folder: Path, suffix: str) -> dict[str, Path]:
    """{"<city>/<stem>": path} over the city folders of one split."""
    if not folder.is_dir():
        return {}
    return {f"{city.name}/{stem}": p for city in sorted(folder.iterdir()) if city.is_dir()
            for stem, p in stems(city, suffix).items()}


@DATASETS.register("cityscapes")
class Cityscapes(FileSegDataset):
    """`cityscapes`: 2975 train / 500 val / 1525 test images of 1024x2048, 19 classes."""

    name = "cityscapes"
    num_classes = 19
    class_names = CLASS_NAMES
    palette = PALETTE
    splits = ("train", "val", "test")

    @classmethod
    def split_present(cls, root: Path, split: str) -> bool:
        return (root / "leftImg8bit" / split).is_dir()

    def _scan(self):
        image_dir, label_dir = self.root / "leftImg8bit" / self.split, self.root / "gtFine" / self.split
        images = _by_city(image_dir, IMAGE_SUFFIX)
        labels = _by_city(label_dir, IDS_SUFFIX) | _by_city(label_dir, TRAIN_IDS_SUFFIX)  # trainIds win
        return pair_by_key(images, labels, lambda k: image_dir / f"{k}{IMAGE_SUFFIX}",
                           lambda k: label_dir / f"{k}{IDS_SUFFIX}")

    def label_spec(self, label_path):
        if label_path.name.endswith(TRAIN_IDS_SUFFIX):
            return TRAIN_ID_LUT, TRAIN_ID_KNOWN
        return ID_LUT, ID_KNOWN
