"""Dataset contract and the training / evaluation views built on it.

A dataset (registered with `@DATASETS.register(name)`) is a class with class attributes
`num_classes`, `class_names`, `palette` and `splits`, constructed as `Cls(root, split)`, whose
`load(i)` returns `(image uint8 3xHxW tensor, mask int64 HxW tensor)` with ignored pixels already
mapped to 255. `sample_id(i)` names the sample (file path or generated id) for error messages.

`TrainView` turns it into an infinite, seeded stream of augmented crops: its keys are
`(index, aug_seed)` pairs from `IterationSampler`, so the stream is a pure function of
(seed, global sample number). Resuming at iteration k restarts the sampler at k * batch_size and
reproduces the uninterrupted run exactly, whatever the number of workers.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from sdesbench.data.transforms import JointTrainTransform, normalize
from sdesbench.errors import DataError
from sdesbench.io import write_torch
from sdesbench.registry import Registry

DATASETS = Registry("dataset", names_entries=True)  # a dataset's `name` is its registered name


class SegDataset(Dataset):
    name: ClassVar[str]
    num_classes: ClassVar[int]
    class_names: ClassVar[list[str]]
    palette: ClassVar[list[tuple[int, int, int]]]
    splits: ClassVar[tuple[str, ...]] = ("train", "val")
    needs_root: ClassVar[bool] = True

    def __init__(self, root: str | Path | None, split: str):
        if split not in self.splits:
            raise DataError(f"{self.name}: unknown split {split!r}; known: {', '.join(self.splits)}")
        check_root_wanted(type(self), root)
        self.root = resolve_root(self.name, root) if self.needs_root else None
        self.split = split

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sample_id(self, index: int) -> str:
        return f"{self.name}/{self.split}/{index}"

    def image_size(self, index: int) -> tuple[int, int]:
        """(H, W) of sample `index`. This default decodes the sample; datasets on disk read the file
        header instead (`FileSegDataset`), generated ones know it."""
        return tuple(self.load(index)[1].shape[-2:])

    def source(self) -> str:
        """Where this split's samples come from (a list file, a folder), for `sdesbench data check`."""
        return "generated in code"

    def prediction_values(self, train_ids: torch.Tensor) -> torch.Tensor:
        """A predicted class map (H x W train ids) as the values an exported prediction file holds (uint8): the
        train ids themselves, unless the dataset's benchmark reads other ids (Cityscapes: label ids)."""
        return train_ids.to(torch.uint8)

    def prediction_name(self, index: int) -> str:
        """The file name of sample `index`'s exported prediction: its image's name with `.png`, as
        mmsegmentation's `IoUMetric(format_only)` and CIRKD's test.py name theirs."""
        return f"{Path(self.sample_id(index)).stem}.png"

    def split_warnings(self) -> list[str]:
        """Lines about this split that do not make it wrong (e.g. a list of unusual length)."""
        return []

    def fingerprint(self) -> str:
        """Identifies the file list (for caching class statistics and check results)."""
        h = hashlib.sha256(f"{self.name}/{self.split}/{len(self)}".encode())
        for i in range(len(self)):
            h.update(self.sample_id(i).encode())
        return h.hexdigest()[:16]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(index)


def build_dataset(name: str, root: str | Path | None, split: str) -> SegDataset:
    """The registered dataset `name` over `root` (else $SDESBENCH_DATA/<name>), split `split`."""
    return DATASETS.get(name)(root, split)


def check_root_wanted(cls: type[SegDataset], root: str | Path | None) -> None:
    """A folder given for a dataset generated in code is a mistake (it would be ignored, and the generated
    data evaluated instead of the folder's): one line."""
    if root is not None and not cls.needs_root:
        raise DataError(f"dataset {cls.name!r} is generated in code and reads no folder, yet one was given: {root} "
                        "(drop --data-root / data.root)")


def resolve_root(name: str, root: str | Path | None) -> Path:
    """`root`, else $SDESBENCH_DATA/<name>; a clear error when neither exists."""
    if root is None:
        env = os.environ.get("SDESBENCH_DATA")
        if not env:
            raise DataError(f"dataset {name!r} needs a folder: pass --data-root PATH or set SDESBENCH_DATA")
        root = Path(env) / name
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset {name!r}: folder not found: {root}")
    return root


class TrainView(Dataset):
    """Augmented training crops, keyed by (index, aug_seed)."""

    def __init__(self, base: SegDataset, crop: list[int], scale: list[float], flip: bool):
        self.base = base
        self.transform = JointTrainTransform(crop, scale, flip)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, aug_seed = key
        try:
            image, mask = self.base.load(index)
        except DataError:
            raise
        except Exception as e:  # a file that became unreadable mid-run: name it
            raise DataError(f"cannot read {self.base.sample_id(index)}: {e}") from None
        image, mask = self.transform(image, mask, aug_seed)
        return normalize(image), mask


class EvalView(Dataset):
    """Whole images, normalised, no augmentation."""

    def __init__(self, base: SegDataset, max_images: int | None = None):
        self.base = base
        self.n = len(base) if max_images is None else min(max_images, len(base))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            image, mask = self.base.load(index)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot read {self.base.sample_id(index)}: {e}") from None
        return normalize(image), mask

    def image_size(self, index: int) -> tuple[int, int]:
        return self.base.image_size(index)


class SizeGroupedBatches(Sampler):
    """Batches of `batch_size` indices of equal image size (H x W), for whole-image evaluation.

    Whole images cannot be stacked unless they have the same size (Cityscapes: all 1024 x 2048;
    CamVid: all 360 x 480; VOC: many sizes). Indices come in `indices` order and go to the pending
    batch of their size; a batch is emitted when full, and the partial batches at the end, in the
    order their sizes first appeared. Every index appears exactly once, so order-independent
    metrics (a confusion matrix) are those of batch 1.
    """

    def __init__(self, indices: Sequence[int], sizes: Callable[[int], tuple[int, int]], batch_size: int):
        self.batches: list[list[int]] = []
        pending: dict[tuple[int, int], list[int]] = {}
        for i in indices:
            batch = pending.setdefault(tuple(sizes(i)), [])
            batch.append(i)
            if len(batch) == batch_size:
                self.batches.append(list(batch))
                batch.clear()
        self.batches += [b for b in pending.values() if b]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class IterationSampler(Sampler):
    """Keys for iterations [start_iter, iters) of a run; shards a global batch over DDP ranks.

    Global sample k belongs to iteration k // global_batch; rank r takes every world-th
    sample of each global batch, so the union over ranks is the single-process stream.
    """

    def __init__(self, n: int, batch_size: int, iters: int, seed: int, start_iter: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.iters, self.seed = n, batch_size, iters, seed
        self.start_iter, self.rank, self.world = start_iter, rank, world_size
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _key(self, k: int) -> tuple[int, int]:
        epoch, pos = divmod(k, self.n)
        perm = self._perm_cache.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            self._perm_cache = {epoch: perm}
        aug_seed = (self.seed * 2_654_435_761 + k * 40_503 + 12_345) % (2**63 - 1)
        return int(perm[pos]), aug_seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gb = self.batch_size * self.world
        for it in range(self.start_iter, self.iters):
            for j in range(self.batch_size):
                yield self._key(it * gb + j * self.world + self.rank)

    def __len__(self) -> int:
        return (self.iters - self.start_iter) * self.batch_size


def stats_cache_path(ds: SegDataset, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"stats-{ds.name}-{ds.split}-{ds.fingerprint()}.pt"


def save_class_pixel_counts(path: Path, counts: torch.Tensor) -> None:
    write_torch(path, counts)  # atomic: DDP ranks may write the same cache at once


def mask_class_counts(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pixels per class of one label map; ignored (255) and any out-of-range values are not counted."""
    valid = mask[(mask >= 0) & (mask < num_classes)]
    return torch.bincount(valid.flatten().long(), minlength=num_classes)


def read_cache_entry(path: Path, read: Callable[[Path], Any], valid: Callable[[Any], bool]) -> Any | None:
    """The value cached in `path`, or None for a miss. A truncated, corrupt or malformed entry is a
    miss too (the caller recomputes and rewrites it), said in one line on stderr."""
    if not path.is_file():
        return None
    try:
        value = read(path)
        if valid(value):
            return value
        reason = "unexpected content"
    except Exception as e:  # whatever the decoder raises on a damaged file
        first_line = str(e).strip().split("\n")[0][:100]
        reason = f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__
    print(f"note: cache entry {path} was unreadable ({reason}); recomputing it", file=sys.stderr)
    return None


def class_pixel_counts(ds: SegDataset, cache_dir: Path | None = None) -> torch.Tensor:
    """Per-class pixel counts over a split (ignored pixels excluded), cached by file-list fingerprint."""
    cache = None
    if cache_dir is not None:
        cache = stats_cache_path(ds, cache_dir)
        cached = read_cache_entry(cache, lambda p: torch.load(p, weights_only=True),
                                  lambda c: isinstance(c, torch.Tensor) and c.dtype == torch.int64
                                  and tuple(c.shape) == (ds.num_classes,) and bool((c >= 0).all()))
        if cached is not None:
            return cached
    counts = torch.zeros(ds.num_classes, dtype=torch.int64)
    for i in range(len(ds)):
        counts += mask_class_counts(ds.load(i)[1], ds.num_classes)
    if cache is not None:
        save_class_pixel_counts(cache, counts)
    return counts
