"""`results.json`: the typed record of one run, written by the engine and read by everything else.

The file is the dataclass below as JSON, with a `schema` number. Version 1 (written before the
field existed) has the same keys and loads unchanged; a newer version than this code knows is
refused with one line rather than misread.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdesbench.config import from_dict
from sdesbench.errors import ConfigError, StorageError
from sdesbench.io import read_json, write_json

SCHEMA_VERSION = 2
RECORD_FILE = "results.json"
Status = Literal["completed", "failed", "interrupted"]


@dataclass
class Scores:
    miou: float
    pixel_acc: float


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
        data["schema"] = SCHEMA_VERSION  # version 1 has the same fields
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
