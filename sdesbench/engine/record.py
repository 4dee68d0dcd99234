"""`results.json`: the typed record of one run, written by the engine and read by everything else.

The file is the dataclass below as JSON, with a `schema` number. Version 1 (written before the
field existed) has the keys of version 2; version 3 added `history` (the periodic evaluations of
`eval.every`), `best` (the best of them, recorded beside the final-iteration metric, never instead
of it) and `image_counts`. Older records load with those fields empty; a newer version than this
code knows is refused with one line rather than misread.

`image_counts.npz` beside `results.json` holds the final evaluation's per-image, per-class true
positive, false positive and false negative counts (one images x 3 x classes int32 array per
prediction, "student" and e.g. "ens_t", plus the images' ids): a few kilobytes to a few hundred,
kept in git with the record, so a per-image bootstrap (`report --stats`) needs no re-run.
"""
from __future__ import annotations

import dataclasses
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sdesbench.config import from_dict
from sdesbench.errors import ConfigError, StorageError
from sdesbench.io import read_json, write_bytes, write_json

SCHEMA_VERSION = 3
RECORD_FILE = "results.json"
COUNTS_FILE = "image_counts.npz"
Status = Literal["completed", "failed", "interrupted"]


@dataclass
class Scores:
    miou: float
    pixel_acc: float


@dataclass
class Evaluation:
    """One periodic evaluation (`eval.every`) of the student, on `images` images of the evaluation set."""

    iteration: int
    images: int
    miou: float
    pixel_acc: float
    per_class_iou: dict[str, float | None] = field(default_factory=dict)
    extra: dict[str, Scores] = field(default_factory=dict)  # e.g. SDES's Ens-T

    def scores(self, source: str = "student") -> Scores | None:
        return Scores(self.miou, self.pixel_acc) if source == "student" else self.extra.get(source)


@dataclass
class Best:
    """The history's highest student mIoU (the earliest on ties) and where it was reached."""

    miou: float
    iteration: int
    images: int


def best_of(history: list[Evaluation]) -> Best | None:
    if not history:
        return None
    top = max(history, key=lambda e: (e.miou, -e.iteration))
    return Best(top.miou, top.iteration, top.images)


@dataclass
class RunRecord:
    status: Status
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    model: str = ""
    method: str = ""
    dataset: str = ""
    seed: int = 0
    iterations: int = 0
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    params: int | None = None
    params_m: float | None = None
    pretrained: bool = False
    wall_time_s: float = 0.0
    iters_per_s: float | None = None
    peak_memory_mb: float | None = None
    device: str = ""
    world_size: int = 1
    amp: str = "off"
    torch_version: str | None = None
    sdesbench_version: str | None = None
    git_commit: str | None = None
    python: str | None = None
    finished_at: str | None = None
    metrics: Scores | None = None
    per_class_iou: dict[str, float | None] = field(default_factory=dict)
    extra_metrics: dict[str, Scores] = field(default_factory=dict)
    history: list[Evaluation] = field(default_factory=list)  # periodic evaluations, the last at the final iteration
    best: Best | None = None  # of `history`; the table metric stays `metrics` (the final iteration's)
    image_counts: str | None = None  # COUNTS_FILE beside results.json when the final evaluation wrote it
    schema: int = SCHEMA_VERSION

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def eval_split(self) -> str | None:
        return (self.config.get("data") or {}).get("eval_split")

    def scores(self, source: str = "student") -> Scores | None:
        """The student's scores, or those of an extra prediction (e.g. "ens_t")."""
        return self.metrics if source == "student" else self.extra_metrics.get(source)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {"schema": d.pop("schema"), **d}

    @classmethod
    def from_dict(cls, data: Any, where: str = "record") -> "RunRecord":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping")
        data = dict(data)
        version = data.setdefault("schema", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ConfigError(f"{where}: schema {version!r} is newer than this sdesbench reads ({SCHEMA_VERSION})")
        data["schema"] = SCHEMA_VERSION  # versions 1 and 2 have a subset of the fields (the others default)
        return from_dict(cls, data, where)


def record_path(folder: str | Path) -> Path:
    return Path(folder) / RECORD_FILE


def write_record(folder: str | Path, record: RunRecord) -> None:
    write_json(record_path(folder), record.to_dict())


def read_record(folder: str | Path | None) -> RunRecord | None:
    """The run's record, None when it has none yet; `StorageError` when the file is unreadable or
    not a run record (truncated, edited by hand, from a newer version)."""
    if folder is None:
        return None
    path = record_path(folder)
    if not path.is_file():
        return None
    data = read_json(path)
    try:
        return RunRecord.from_dict(data, str(path))
    except ConfigError as e:
        raise StorageError(f"{path} is not a valid run record ({e})") from None


@dataclass
class ImageCounts:
    """Per-image confusion counts of a final evaluation (see the module docstring)."""

    image_ids: list[str]
    counts: dict[str, np.ndarray]  # prediction ("student", "ens_t") -> images x 3 (TP, FP, FN) x classes


def write_image_counts(folder: str | Path, counts: ImageCounts) -> str:
    """COUNTS_FILE in `folder` (atomically); returns its name for the record."""
    buf = io.BytesIO()
    arrays = {name: np.asarray(a, dtype=np.int32) for name, a in counts.counts.items()}
    np.savez_compressed(buf, image_ids=np.asarray(counts.image_ids, dtype=str), **arrays)
    write_bytes(Path(folder) / COUNTS_FILE, buf.getvalue())
    return COUNTS_FILE


def read_image_counts(folder: str | Path, record: RunRecord) -> ImageCounts | None:
    """The record's per-image counts, None when it has none; `StorageError` when the file is unreadable."""
    if not record.image_counts:
        return None
    path = Path(folder) / record.image_counts
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            ids = [str(i) for i in data["image_ids"]]
            counts = {k: data[k].astype(np.int64) for k in data.files if k != "image_ids"}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise StorageError(f"{path} is unreadable ({type(e).__name__})") from None
    if any(a.shape != (len(ids), 3, record.num_classes) for a in counts.values()):
        raise StorageError(f"{path} does not match its record ({len(ids)} images, {record.num_classes} classes)")
    return ImageCounts(ids, counts)
