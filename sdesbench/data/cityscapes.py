"""`cityscapes`: Cityscapes fine annotations, 19 evaluation classes.

Layout (root = the folder holding leftImg8bit/ and gtFine/):
    leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<stem>_gtFine_labelTrainIds.png   used where present, else
    gtFine/{train,val,test}/<city>/<stem>_gtFine_labelIds.png        mapped to the 19 train ids
The labelIds -> train id table is the one of cityscapesScripts (helpers/labels.py); every other
id (unlabeled, ego vehicle, ..., guard rail, caravan, trailer) is ignored (255).

Test-server submissions hold label ids, not train ids: `prediction_values` maps each predicted train id back
to its label id (`LABEL_ID_OF_TRAIN_ID`, the inverse of the table above on the 19 evaluated classes), as
CIRKD's test.py does before saving its PNGs (winycg/CIRKD test.py, `id2trainId(..., reverse=True)`, at
dab64dbb5e41). The server's script finds a prediction by the pattern `<city>_<seq>_<frame>*.png` anywhere
under the results folder and reads its values as label ids (cityscapesScripts
evaluation/evalPixelLevelSemanticLabeling.py, `getPrediction`, at 0bcc4a725495), so the file named after the
image (`<city>_<seq>_<frame>_leftImg8bit.png`) is found.

License plates: labels.py gives "license plate" id -1 and trainId -1, and its comment says a label
with id -1 is not drawn into ground-truth images. preparation/json2labelImg.py skips every polygon
whose id is negative, for ids and for trainIds (createTrainIdLabelImgs.py calls it), so neither
`*_labelIds.png` nor `*_labelTrainIds.png` holds a plate value: plate pixels keep the label of the
object drawn under them, in practice the car (id 26, train id 13). Checked in mcordts/cityscapesScripts
at 0bcc4a72549590fd80d71d8465be3a0c4b1c06e8 (labels.py last changed in 9f0aa8d3fa93, json2labelImg.py
in 02a0f28ea860).
"""
from __future__ import annotations

from pathlib import Path

import torch

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
# train id -> label id for a submission; anything else (the ignore index) -> 0, cityscapesScripts' "unlabeled"
LABEL_ID_OF_TRAIN_ID = torch.zeros(256, dtype=torch.uint8)
LABEL_ID_OF_TRAIN_ID[: len(EVAL_IDS)] = torch.tensor(EVAL_IDS, dtype=torch.uint8)
# ids 0..33 are what cityscapesScripts writes (no plate value: module docstring); 255 is accepted as well and
# ignored (LUT default), so a file already holding the ignore index is not reported: it changes no label
ID_KNOWN = frozenset(range(34)) | {IGNORE_INDEX}
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

    def source(self) -> str:
        return str(self.root / "leftImg8bit" / self.split)

    def label_spec(self, label_path):
        if label_path.name.endswith(TRAIN_IDS_SUFFIX):
            return TRAIN_ID_LUT, TRAIN_ID_KNOWN
        return ID_LUT, ID_KNOWN

    def prediction_values(self, train_ids: torch.Tensor) -> torch.Tensor:
        """Label ids, the values the Cityscapes test server reads (module docstring)."""
        return LABEL_ID_OF_TRAIN_ID[train_ids.long()]
