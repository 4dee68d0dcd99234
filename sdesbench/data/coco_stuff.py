"""`coco_stuff164k`: COCO-Stuff 164K (the COCO 2017 images with 80 thing and 91 stuff classes), 171 classes.

Layout (root = the folder holding images/ and annotations/, mmsegmentation's data/coco_stuff164k):
    images/{train2017,val2017}/<id>.jpg                             118,287 / 5,000 images
    annotations/{train2017,val2017}/<id>_labelTrainIds.png          train ids, used where present, else
    annotations/{train2017,val2017}/<id>.png                        the stuffthingmaps as distributed
The `*_labelTrainIds.png` files are what mmsegmentation's converter writes
(tools/dataset_converters/coco_stuff164k.py) beside the stuffthingmaps: train ids 0..170, 255 for
unlabelled pixels, read as they are. The stuffthingmaps themselves (stuffthingmaps_trainval2017.zip
of nightrome/cocostuff) hold 182 ids (the COCO category id minus one, 0..181) and 255; they are
accepted too and mapped as the converter maps them: the 11 ids of COCO categories that were never
annotated (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90) are dropped and the other 171 numbered in order, so id
k goes to the number of used ids below it (open-mmlab/mmsegmentation, commit
b7fcd9e5835ed93c3f144b1d6e88c08bb1bdc546, tools/dataset_converters/coco_stuff164k.py, `clsID_to_trID`;
the same in the 1.2.2 release). One folder may hold both kinds; per image the train-id file wins.
An unused id in a stuffthingmap is reported by `sdesbench data check` (the converter would have
left it as it was, silently a wrong class). Converting first is not needed.

CIRKD trains and scores this dataset on the raw 182 ids (dataset/coco_stuff_164k.py, num_class
182), so its mean IoU averages 182 classes, 11 of which never occur and count as IoU 0: about
171/182 of the 171-class mean this suite reports (docs/datasets.md).

Class names, their order and the palette (sdesbench/data/classes/coco_stuff164k.csv) are
mmsegmentation's COCOStuffDataset (commit 186161ee3c1fb592072c8f8fb39816dd55f32083,
mmseg/datasets/coco_stuff.py; the same in the 1.2.2 release). That palette gives a few pairs of
classes the same colour (person and bicycle, for one); it is kept as it is, so pictures compare with
mmsegmentation's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sdesbench import IGNORE_INDEX
from sdesbench.data.base import DATASETS
from sdesbench.data.files import FileSegDataset, build_lut, class_table, pair_by_key, stems

CLASS_NAMES, PALETTE = class_table("coco_stuff164k.csv")  # train id, name, colour per class
UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)  # ids of COCO categories never annotated
RAW_IDS = [i for i in range(182) if i not in UNUSED_IDS]  # train id t is stuffthingmap id RAW_IDS[t]
RAW_LUT = build_lut({raw: train_id for train_id, raw in enumerate(RAW_IDS)})
RAW_KNOWN = frozenset(RAW_IDS) | {IGNORE_INDEX}
# train id t -> COCO category id RAW_IDS[t] + 1 (1..182), what cocostuffapi's label maps hold (exported predictions)
CATEGORY_ID_OF_TRAIN_ID = torch.tensor([raw + 1 for raw in RAW_IDS], dtype=torch.uint8)
TRAIN_ID_LUT = build_lut({i: i for i in range(len(CLASS_NAMES))})
TRAIN_ID_KNOWN = frozenset(range(len(CLASS_NAMES))) | {IGNORE_INDEX}
TRAIN_IDS_TAG = "_labelTrainIds"  # <id>_labelTrainIds.png: the converter's output
TRAIN_IDS_SUFFIX = f"{TRAIN_IDS_TAG}.png"
SPLIT_FOLDERS = {"train": "train2017", "val": "val2017"}


def label_files(folder: Path) -> dict[str, Path]:
    """{image stem: label file} in one annotation folder, the train-id file where both kinds exist."""
    raw = {stem: p for stem, p in stems(folder, ".png").items() if not stem.endswith(TRAIN_IDS_TAG)}
    return raw | stems(folder, TRAIN_IDS_SUFFIX)


@DATASETS.register("coco_stuff164k")
class COCOStuff164K(FileSegDataset):
    """`coco_stuff164k`: 118,287 train / 5,000 val images, 171 classes (80 things, 91 stuff)."""

    num_classes = 171
    class_names = CLASS_NAMES
    palette = PALETTE
    splits = ("train", "val")
    release_sizes = {"train": 118287, "val": 5000}

    @classmethod
    def split_present(cls, root: Path, split: str) -> bool:
        return (root / "images" / SPLIT_FOLDERS[split]).is_dir()

    def _scan(self):
        folder = SPLIT_FOLDERS[self.split]
        image_dir, label_dir = self.root / "images" / folder, self.root / "annotations" / folder
        return pair_by_key(stems(image_dir, ".jpg"), label_files(label_dir), lambda k: image_dir / f"{k}.jpg",
                           lambda k: label_dir / f"{k}{TRAIN_IDS_SUFFIX}")

    def source(self) -> str:
        return str(self.root / "images" / SPLIT_FOLDERS[self.split])

    def prediction_values(self, train_ids: torch.Tensor) -> torch.Tensor:
        """COCO category ids (1..182; stuff 92..182): the values of the label maps COCO-Stuff's own tools read
        and write, `pngToCocoResult` turning such a PNG into the COCO result JSON its challenge server scores
        (nightrome/cocostuffapi PythonAPI/cocostuff/cocoStuffHelper.py: `labelMap[mask] = category_id`). Each
        train id goes back through the converter's numbering (`RAW_IDS`: stuffthingmap id = category id - 1).
        mmsegmentation's `format_only` would write the train ids 0..170 instead, which no COCO tool reads."""
        return CATEGORY_ID_OF_TRAIN_ID[train_ids.long()]

    def label_spec(self, label_path):
        if label_path.name.endswith(TRAIN_IDS_SUFFIX):
            return TRAIN_ID_LUT, TRAIN_ID_KNOWN
        return RAW_LUT, RAW_KNOWN
