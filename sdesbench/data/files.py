"""Datasets stored as image/label file pairs on disk: decoding, label mapping and orphan reports.

`FileSegDataset` is the common base of the datasets on disk (`camvid`, `cityscapes`, `voc`,
`ade20k`, `coco_stuff164k`, `pascal_context59`). A subclass lists its (image, label) pairs for a
split in `_scan()`, which also returns the problem lines of that listing (images without labels,
labels without images, listed files that are missing); `orphans()` hands those lines to the checker.
Only complete pairs become samples. Long class lists (names and palette) are package data,
`data/classes/<dataset>.csv`, read by `class_table`.

Images and labels are decoded with PIL (labels must be read as their index values: a VOC palette
PNG would come out as RGB from torchvision's decoder, which is also deprecated since torchvision
0.29 and lets libpng print to stderr). Truncated or corrupt files raise `DataError` naming the path:
PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` stays at its default (False), so `load()` raises instead of
padding a truncated file.

Raw label values go through a 256-entry lookup table to train ids with 255 ignored (`label_spec`
gives the table and the raw values a label file may hold). Raw values outside that set are ignored
by `load()` (so a stray value can never crash a loss) but reported by `sdesbench data check`, which
training runs first and which refuses such data.
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
from importlib import resources
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from sdesbench import IGNORE_INDEX
from sdesbench.data.base import SegDataset
from sdesbench.errors import DataError
from sdesbench.io import write_file


def decode_image(path: Path) -> tuple[torch.Tensor, str]:
    """(RGB uint8 3xHxW, the file's own PIL mode); DataError naming the file when it is missing,
    corrupt or truncated. Grey, palette and RGBA images are converted (alpha dropped)."""
    try:
        with Image.open(path) as im:
            im.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES is False)
            mode = im.mode
            rgb = np.array(im if mode == "RGB" else im.convert("RGB"))
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), mode


def read_image(path: Path) -> torch.Tensor:
    """RGB uint8 3xHxW; DataError naming the file when it is missing, corrupt or truncated."""
    return decode_image(path)[0]


def read_label(path: Path) -> torch.Tensor:
    """Raw label values (uint8 HxW): grey levels, or the indices of a palette PNG."""
    try:
        with Image.open(path) as im:
            im.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES is False)
            if im.mode not in ("L", "P"):
                raise DataError(f"label {path} is a {im.mode} image; expected 8-bit class indices (mode L or P)")
            return torch.from_numpy(np.array(im, dtype=np.uint8))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read label {path}: {e}") from None


def class_table(file: str) -> tuple[list[str], list[tuple[int, int, int]]]:
    """(class names, palette) in train id order from `sdesbench/data/classes/<file>`, a CSV with the
    columns train_id, name, r, g, b (package data: long class lists are kept out of the code)."""
    text = (resources.files("sdesbench.data") / "classes" / file).read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    if [int(r["train_id"]) for r in rows] != list(range(len(rows))):
        raise ValueError(f"{file}: train ids must run 0, 1, 2, ... in order")
    return [r["name"] for r in rows], [(int(r["r"]), int(r["g"]), int(r["b"])) for r in rows]


def write_label_png(path: Path, values: torch.Tensor) -> None:
    """An 8-bit grey PNG (mode L) of a H x W map of values 0..255, written atomically; what `read_label`
    reads back."""
    image = Image.fromarray(values.to(torch.uint8).cpu().numpy())  # a 2-D uint8 array is mode L
    write_file(path, lambda f: image.save(f, format="PNG"))


class PredictionFiles:
    """Exported predictions (`sdesbench eval --export DIR`): one PNG per image of the first `count` samples
    of `dataset`, named by `dataset.prediction_name` and holding `dataset.prediction_values` (train ids, or a
    benchmark's own ids: Cityscapes label ids). Two images of the same name would overwrite each other: one
    DataError line before anything is written."""

    def __init__(self, dataset: SegDataset, folder: Path, count: int):
        self.dataset, self.folder = dataset, Path(folder)
        self.names = [dataset.prediction_name(i) for i in range(count)]
        seen: dict[str, int] = {}
        for i, name in enumerate(self.names):
            if name in seen:
                raise DataError(f"--export: {dataset.sample_id(seen[name])} and {dataset.sample_id(i)} would both be "
                                f"written to {self.folder / name}")
            seen[name] = i

    def write(self, index: int, train_ids: torch.Tensor) -> Path:
        path = self.folder / self.names[index]
        write_label_png(path, self.dataset.prediction_values(train_ids))
        return path


def build_lut(mapping: dict[int, int]) -> torch.Tensor:
    """256-entry raw value -> train id table; values not in `mapping` map to the ignore index."""
    lut = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
    for raw, train_id in mapping.items():
        lut[raw] = train_id
    return lut


def reduce_zero_label(num_classes: int) -> tuple[torch.Tensor, frozenset[int]]:
    """(lookup table, known raw values) of labels whose 0 means "no class": 0 is ignored, raw k in
    1..num_classes becomes train id k - 1 and 255 stays ignored (mmsegmentation's `reduce_zero_label`)."""
    lut = build_lut({k: k - 1 for k in range(1, num_classes + 1)})
    return lut, frozenset(range(num_classes + 1)) | {IGNORE_INDEX}


def describe_values(values: list[int]) -> str:
    """Compact text for a set of integers: '0..10, 255'."""
    values = sorted(values)
    runs, start = [], values[0]
    for a, b in zip(values, values[1:] + [None]):
        if b != a + 1:
            runs.append(str(start) if start == a else f"{start}..{a}")
            start = b
    return ", ".join(runs)


class FileSegDataset(SegDataset):
    """Image/label pairs on disk; subclasses implement `_scan()` and set the label mapping."""

    required_splits: ClassVar[tuple[str, ...]] = ("train", "val")  # the checker reports these when absent
    paper_splits: ClassVar[tuple[str, ...]] = ()  # a paper protocol needs these: the checker warns when absent
    release_sizes: ClassVar[dict[str, int]] = {}  # pairs per split in the release: the checker warns otherwise

    def __init__(self, root, split: str):
        super().__init__(root, split)
        self.pairs, self._orphans = self._scan()
        if not self.pairs:
            raise DataError(f"{self.name}: no image/label pairs for split {split!r} under {self.root}"
                            + (f" ({self._orphans[0]})" if self._orphans else ""))

    # -- to implement --------------------------------------------------------------------
    def _scan(self) -> tuple[list[tuple[Path, Path]], list[str]]:
        """(complete (image, label) pairs in a stable order, problem lines about the listing)."""
        raise NotImplementedError

    def label_spec(self, label_path: Path) -> tuple[torch.Tensor, frozenset[int]]:
        """(raw -> train id lookup table, raw values the file may hold) for this label file
        (per file because Cityscapes has two kinds of label file)."""
        raise NotImplementedError

    @classmethod
    def split_present(cls, root: Path, split: str) -> bool:
        """Whether the folder holds this split at all (the public CamVid copy lacks test)."""
        raise NotImplementedError

    # -- contract ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, raw = self.load_raw(index)
        return image, self.label_spec(self.pairs[index][1])[0][raw.long()]

    def load_raw(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image uint8 3xHxW, raw label values uint8 HxW) before the label mapping."""
        image_path, label_path = self.pairs[index]
        return read_image(image_path), read_label(label_path)

    def sample_id(self, index: int) -> str:
        return str(self.pairs[index][0])

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) from the image file's header, without decoding it."""
        path = self.pairs[index][0]
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Exception as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        return h, w

    def orphans(self) -> list[str]:
        """Problem lines about this split's files: images without labels, labels without images."""
        return list(self._orphans)

    def split_warnings(self) -> list[str]:
        """A line when the split holds another number of pairs than the release (`release_sizes`): a partial
        download or a custom subset, which is allowed, but should not be mistaken for the benchmark's split."""
        standard = self.release_sizes.get(self.split)
        if standard is None or len(self) == standard:
            return []
        return [f"{self.source()}: {len(self):,} image/label pair(s); {self.name}'s {self.split} split holds "
                f"{standard:,}"]

    def fingerprint(self) -> str:
        """The file list with each file's size and modification time: a replaced file is re-checked."""
        h = hashlib.sha256(f"{self.name}/{self.split}/{len(self)}".encode())
        for pair in self.pairs:
            for p in pair:
                st = p.stat()
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def stems(folder: Path, suffix: str) -> dict[str, Path]:
    """{file name without `suffix`: path} for the files in `folder` whose names end with `suffix`."""
    if not folder.is_dir():
        return {}
    return {p.name[: len(p.name) - len(suffix)]: p for p in sorted(folder.iterdir())
            if p.name.endswith(suffix) and p.is_file()}


def release_folder(root: Path, nested: str, marker: str) -> Path:
    """`root` itself, or `root/<nested>` when that exists and `root` holds no `<marker>`: the folder a
    dataset was unpacked to may be the release folder or the one above it."""
    inner = root / nested
    return inner if inner.is_dir() and not (root / marker).exists() else root


def path_parts(entry: str) -> list[str]:
    """The components of a path written on another machine (either slash)."""
    return [p for p in re.split(r"[\\/]", entry) if p]


def file_name(entry: str) -> str:
    """The last component of a path written on another machine (either slash)."""
    return path_parts(entry)[-1]


def pair_by_key(images: dict[str, Path], labels: dict[str, Path], expected_image, expected_label,
                listed: list[str] | None = None, list_file: Path | None = None,
                report_unlisted: bool = True) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Match images and labels by key; return the complete pairs and one problem line per orphan.

    `listed` (keys from a list file) fixes the samples and their order; otherwise every image on
    disk is a sample, sorted. With `report_unlisted`, files outside the list are checked too
    (an unlisted image without label, a label without image).
    """
    keys = listed if listed is not None else sorted(images)
    pairs, problems = [], []
    for key in keys:
        if key not in images:
            problems.append(f"{expected_image(key)}: listed in {list_file} but missing")
        elif key not in labels:
            problems.append(f"{images[key]}: image without label (expected {expected_label(key)})")
        else:
            pairs.append((images[key], labels[key]))
    if report_unlisted:
        seen = set(keys)
        problems += [f"{images[k]}: image without label (expected {expected_label(k)})"
                     for k in sorted(images) if k not in seen and k not in labels]
        problems += [f"{labels[k]}: label without image (expected {expected_image(k)})"
                     for k in sorted(labels) if k not in images]
    return pairs, problems
