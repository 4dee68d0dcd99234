"""`results.json`: the typed record of one run, written by the engine and read by everything else.

The file is the dataclass below as JSON, with a `schema` number. Version 1 (written before the
field existed) has the keys of version 2; version 3 added `history` (the periodic evaluations of
`eval.every`), `best` (the best of them, recorded beside the final-iteration metric, never instead
of it) and `image_counts`. Version 4 made the times honest: `wall_time_s` is the run's real wall
time (from the start of `Trainer.run` to its record, summed over resumes: setup, the dataset check,
loader waits, steps, evaluations, checkpoints), `step_time_s` the sum of the training steps alone
(what `wall_time_s` held before), `timings` where the wall time went, and `iters_per_s` the
iterations over `timings.train_s`. Older records load with the added fields empty; a record older
than version 4 has its `wall_time_s` read as `step_time_s`, and its wall time as unknown (None). A
newer version than this code knows is refused with one line rather than misread.

Version 5 added mAcc, the mean per-class accuracy, to every `Scores` (the final metrics, each extra
prediction's) and to each periodic `Evaluation`; in an older record it loads as None. Version 6 added mDice and
mFscore (mmsegmentation's `IoUMetric`) to every `Scores`; in an older record they load as None. Version 7
added `cost` (`RunCost`: device-hours and the images trained on, the run's total cost; its training
FLOPs are those images x the counted FLOPs per image); an older record loads it as None, and `cost_of` derives
it from the record's wall time, world size, device, iterations and batch size where it can.

`evaluations/<key>.json` beside `results.json` holds `EvaluationRecord`s: the run's checkpoint evaluated
again under other evaluation settings (`sdesbench eval --record`, e.g. multi-scale + flip), keyed by
`RunConfig.evaluation_key` of the settings, which the report reads for an extra column. Those of the
best checkpoint (`checkpoints/best.pt`, `train.keep_best`) are in `evaluations/best/<key>.json`, so that
the two checkpoints' numbers never replace each other.

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

from sdesbench.validate import from_dict
from sdesbench.errors import ConfigError, StorageError
from sdesbench.io import read_json, write_bytes, write_json

SCHEMA_VERSION = 7
RECORD_FILE = "results.json"
COUNTS_FILE = "image_counts.npz"
Status = Literal["completed", "failed", "interrupted"]


@dataclass
class Scores:
    miou: float
    pixel_acc: float
    macc: float | None = None  # mean per-class accuracy (engine/metrics.py); None in a record made before it existed
    mdice: float | None = None  # mean Dice and mean F-score (engine/metrics.py); None in a record before version 6
    mfscore: float | None = None

    @classmethod
    def of(cls, metrics: dict[str, Any]) -> "Scores":
        """The scores of one prediction's `ConfusionMatrix.compute` result."""
        return cls(metrics["miou"], metrics["pixel_acc"], metrics.get("macc"), metrics.get("mdice"),
                   metrics.get("mfscore"))


@dataclass
class Evaluation:
    """One periodic evaluation (`eval.every`) of the student, on `images` images of the evaluation set."""

    iteration: int
    images: int
    miou: float
    pixel_acc: float
    per_class_iou: dict[str, float | None] = field(default_factory=dict)
    extra: dict[str, Scores] = field(default_factory=dict)  # e.g. SDES's Ens-T
    macc: float | None = None

    def scores(self, source: str = "student") -> Scores | None:
        return Scores(self.miou, self.pixel_acc, self.macc) if source == "student" else self.extra.get(source)


@dataclass
class Best:
    """The history's highest student mIoU (the earliest on ties) and where it was reached."""

    miou: float
    iteration: int
    images: int


def best_evaluation(history: list[Evaluation]) -> Evaluation | None:
    """The history's evaluation of highest student mIoU, the earliest on ties; None without a history."""
    return max(history, key=lambda e: (e.miou, -e.iteration)) if history else None


def best_of(history: list[Evaluation]) -> Best | None:
    top = best_evaluation(history)
    return Best(top.miou, top.iteration, top.images) if top is not None else None


@dataclass
class Timings:
    """Where a run's wall time went, in seconds summed over its sessions (resumes). The parts do not
    overlap, so they add up to at most `wall_time_s`; the rest is the hooks' own work (log, TensorBoard),
    writing the record and, in a resumed run, the sessions' starts before their checkpoint was read."""

    setup_s: float = 0.0  # from the start of `Trainer.run` to the first iteration, less the dataset check
    data_check_s: float = 0.0  # `data.check` (cached: near 0 after the first run on a dataset)
    train_s: float = 0.0  # the iterations: waiting for the loader's batches and the steps (`step_time_s`)
    eval_s: float = 0.0  # periodic (`eval.every`) and final evaluations
    checkpoint_s: float = 0.0  # writing checkpoints

    def plus(self, other: "Timings") -> "Timings":
        return Timings(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})

    def rounded(self) -> "Timings":
        return Timings(**{f.name: round(getattr(self, f.name), 3) for f in dataclasses.fields(self)})


@dataclass
class RunCost:
    """A run's total cost (schema 7): its device time and the images it trained on; the FLOPs per image are
    counted by `engine.cost.flops_per_image`."""

    device_kind: str  # "GPU" (CUDA), "CPU", or "device" (a record that names no device)
    devices: int  # processes (world size): one GPU each on CUDA
    device_hours: float  # wall time x devices / 3600
    images: int  # training images seen: iterations x batch per process x processes

    @classmethod
    def of(cls, device: str, world_size: int, wall_time_s: float, iterations: int, batch_size: int) -> "RunCost":
        kind = "CPU" if device.startswith("cpu") else "GPU" if device else "device"  # "": a record that names none
        return cls(kind, world_size, round(wall_time_s * world_size / 3600, 6), iterations * batch_size * world_size)

    def train_flops(self, per_image: float) -> float:
        """FLOPs x images: the run's training FLOPs given the counted FLOPs per image."""
        return per_image * self.images


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
    wall_time_s: float | None = None  # real wall time (module docstring); None: unknown (a record before version 4)
    step_time_s: float | None = None  # the training steps alone, summed
    timings: Timings | None = None
    iters_per_s: float | None = None  # iterations / timings.train_s (before version 4: its last session's own rate)
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
    cost: RunCost | None = None  # total cost (schema 7); None in an older record (`cost_of` derives it)
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
        if version < 4:  # its wall_time_s summed the step times only; its real wall time is unknown
            data["step_time_s"], data["wall_time_s"] = data.get("wall_time_s"), None
        data["schema"] = SCHEMA_VERSION  # versions 1 to 6 have a subset of the fields (the others default)
        return from_dict(cls, data, where)


def cost_of(record: RunRecord) -> RunCost | None:
    """The record's total cost: its own (schema 7), else derived from what an older record holds (its wall
    time, world size, device, iterations and batch size); None without a wall time (before schema 4)."""
    if record.cost is not None:
        return record.cost
    batch = (record.config.get("data") or {}).get("batch_size")
    if record.wall_time_s is None or not isinstance(batch, int):
        return None
    return RunCost.of(record.device, record.world_size, record.wall_time_s, record.iterations, batch)


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
    return read_record_file(path)


def read_record_file(path: str | Path) -> RunRecord:
    """A run record stored under any name (`results.json`, a record set aside); `StorageError` when unreadable."""
    data = read_json(path)
    try:
        return RunRecord.from_dict(data, str(path))
    except ConfigError as e:
        raise StorageError(f"{path} is not a valid run record ({e})") from None


EVALUATIONS_DIR = "evaluations"
EVALUATION_SCHEMA = 2  # 2: `Scores` with mdice / mfscore (a version 1 record loads them as None)


@dataclass
class EvaluationRecord:
    """A finished run's checkpoint evaluated again under other evaluation settings (`sdesbench eval --record`):
    `settings` are `RunConfig.evaluation_identity` (the split and every eval setting that changes a number),
    `key` its hash and the file's name; `run_config_hash` and `iteration` name the checkpoint it scored."""

    key: str
    settings: dict[str, Any]
    description: str  # `Inference.describe()` plus the mIoU convention
    run_config_hash: str
    iteration: int
    split: str
    images: int
    metrics: Scores
    per_class_iou: dict[str, float | None] = field(default_factory=dict)
    extra_metrics: dict[str, Scores] = field(default_factory=dict)
    sdesbench_version: str | None = None
    git_commit: str | None = None
    finished_at: str | None = None
    schema: int = EVALUATION_SCHEMA

    def scores(self, source: str = "student") -> Scores | None:
        return self.metrics if source == "student" else self.extra_metrics.get(source)


def evaluation_path(folder: str | Path, key: str, checkpoint: Literal["last", "best"] = "last") -> Path:
    return Path(folder) / EVALUATIONS_DIR / ("best" if checkpoint == "best" else "") / f"{key}.json"


def write_evaluation(folder: str | Path, record: EvaluationRecord, checkpoint: Literal["last", "best"] = "last") -> Path:
    path = evaluation_path(folder, record.key, checkpoint)
    write_json(path, dataclasses.asdict(record))
    return path


def read_evaluation(folder: str | Path | None, key: str,
                    checkpoint: Literal["last", "best"] = "last") -> EvaluationRecord | None:
    """The run's evaluation of its `checkpoint` under the settings of `key`, None when it has none;
    `StorageError` when unreadable."""
    if folder is None:
        return None
    path = evaluation_path(folder, key, checkpoint)
    if not path.is_file():
        return None
    data = read_json(path)
    try:
        if not isinstance(data, dict) or data.get("schema", EVALUATION_SCHEMA) > EVALUATION_SCHEMA:
            raise ConfigError("not an evaluation record this sdesbench reads")
        return from_dict(EvaluationRecord, data, str(path))
    except ConfigError as e:
        raise StorageError(f"{path} is not a valid evaluation record ({e})") from None


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
