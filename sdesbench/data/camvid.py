"""`camvid`: CamVid in the 11-class, 360x480 version distributed with SegNet.

Layout (root = the folder holding these):
    train/ trainannot/ val/ valannot/ test/ testannot/     images and label PNGs of the same name
and, optionally, list files in either of the two forms researchers arrive with:
    train.txt val.txt test.txt            SegNet: "/SegNet/CamVid/train/X.png /SegNet/CamVid/trainannot/X.png"
    camvid_{train,val,test,trainval}_list.txt      CIRKD (and RDD): "train/X.png trainannot/X.png",
        relative to the root; looked for in the root, in list/ and in list/CamVid/
A list entry is resolved by its last two path components (folder/name) under the root, so the
SegNet lists' absolute paths from the authors' machine work; a bare file name is looked up in the
split's folder. The label column must name `<folder>annot/<name>` (as both forms do). Without a
list, every image in the split's folder is a sample.

`trainval` = train + val (for training on both, then evaluating on test): the trainval list where
one exists, else the train samples followed by the val samples.

Labels are class indices 0..10; 11 is void and maps to the ignore index (255 is accepted as
already ignored).
"""
from __future__ import annotations

from pathlib import Path

from sdesbench import IGNORE_INDEX
from sdesbench.data.base import DATASETS
from sdesbench.data.files import FileSegDataset, build_lut, pair_by_key, path_parts, stems
from sdesbench.errors import DataError

CLASS_NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
               "Pedestrian", "Bicyclist"]
PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]
VOID = 11
LUT = build_lut({i: i for i in range(len(CLASS_NAMES))})  # 11 (void) and everything else -> 255
KNOWN = frozenset(range(VOID + 1)) | {IGNORE_INDEX}
# list files of a split, the first found wins: SegNet's, then CIRKD's (which keeps them in dataset/list/CamVid/)
LIST_FILES = ("{split}.txt", "camvid_{split}_list.txt", "list/camvid_{split}_list.txt",
              "list/CamVid/camvid_{split}_list.txt")
PARTS = {"trainval": ("train", "val")}  # splits made of other splits when they have no list of their own


def list_file(root: Path, split: str) -> Path | None:
    return next((root / p.format(split=split) for p in LIST_FILES if (root / p.format(split=split)).is_file()), None)


def own_parts(root: Path, split: str) -> tuple[str, ...]:
    """The splits `split` is read from: itself, or its parts (trainval) when it has no list of its own."""
    return PARTS[split] if split in PARTS and list_file(root, split) is None else (split,)


def annot(key: str) -> str:
    """'train/X.png' -> 'trainannot/X.png': where an image's label lives."""
    folder, name = key.split("/")
    return f"{folder}annot/{name}"


def list_key(entry: str, root: Path, folders: tuple[str, ...]) -> str:
    """'<folder>/<name>' of a list entry: its last two path components (either slash); a bare name is
    looked up in the split's folders."""
    parts = path_parts(entry)
    if len(parts) > 1:
        return "/".join(parts[-2:])
    return next((f"{f}/{parts[0]}" for f in folders if (root / f / parts[0]).is_file()), f"{folders[0]}/{parts[0]}")


def read_list(lst: Path, root: Path, split: str) -> tuple[list[str], list[str]]:
    """(image keys in list order, problem lines about label columns that do not match their image)."""
    keys, problems = [], []
    for n, line in enumerate(lst.read_text().splitlines(), 1):
        columns = line.split()
        if not columns:
            continue
        key = list_key(columns[0], root, PARTS.get(split, (split,)))
        label = path_parts(columns[1])[-2:] if len(columns) > 1 else None
        if label is not None and label not in (annot(key).split("/"), [key.split("/")[1]]):
            problems.append(f"{lst}:{n}: label {columns[1]} does not belong to image {columns[0]} "
                            f"(expected {annot(key)})")
            continue
        keys.append(key)
    return keys, problems


def scan_split(root: Path, split: str) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(image, label) pairs of one split with a folder or list of its own, and the listing's problems."""
    lst = list_file(root, split)
    if lst is None and not (root / split).is_dir():
        raise DataError(f"camvid: split {split!r} not found under {root} (no {split}/ folder, no "
                        f"{split}.txt or camvid_{split}_list.txt)")
    listed, problems = read_list(lst, root, split) if lst else (None, [])
    # the split's own folders and any other a list names (a custom train list may take val images)
    folders = dict.fromkeys([*PARTS.get(split, (split,)), *(k.split("/")[0] for k in listed or [])])

    def files(suffix: str) -> dict[str, Path]:
        return {f"{f}/{name}": p for f in folders for name, p in stems(root / f"{f}{suffix}", "").items()}

    pairs, orphans = pair_by_key(files(""), files("annot"), lambda k: root / k, lambda k: root / annot(k), listed, lst)
    return pairs, problems + orphans


@DATASETS.register("camvid")
class CamVid(FileSegDataset):
    """`camvid`: 367 train / 101 val / 233 test images (trainval = train + val), 11 classes, void ignored."""

    num_classes = 11
    class_names = CLASS_NAMES
    palette = PALETTE
    splits = ("train", "val", "test", "trainval")

    @classmethod
    def split_present(cls, root: Path, split: str) -> bool:
        return all((root / part).is_dir() or list_file(root, part) is not None for part in own_parts(root, split))

    def _scan(self):
        scans = [scan_split(self.root, part) for part in own_parts(self.root, self.split)]
        return [p for pairs, _ in scans for p in pairs], [line for _, lines in scans for line in lines]

    def source(self) -> str:
        parts = own_parts(self.root, self.split)
        return " + ".join(str(list_file(self.root, part) or self.root / part) for part in parts)

    def label_spec(self, label_path):
        return LUT, KNOWN
