"""A table spec at a preset, resolved once into plain typed run requests, which planning works from.

Every layer of a spec that shapes a run is applied here, in one place and one order, and nowhere else:
the spec's `base`, the preset's sections, the group's `config` and its settings for the preset, the
method's options (the spec's, the group's, the preset's, then the row's), the network, the teacher and
the spec's plugins (every process training the run loads them).
`experiments/plan.py` turns each `RunRequest` into one planned run per seed without reading the spec
again; a spec that extends another (`extends:`) is composed into one spec when it loads
(`experiments/spec.py`), so its rows resolve exactly as the base's do and shared runs keep their keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdesbench.config import merge
from sdesbench.experiments.spec import Group, Row, Spec
from sdesbench.experiments.sweeps import sweep_groups


@dataclass(frozen=True)
class TeacherRequest:
    """The teacher a row distils from: its network, its protocol (the row's group's, except the group's
    `model` settings, which are the student network's) and whether it is trained at the row's own seed
    (`same_seed`) or at one derived from it."""

    model: str
    settings: dict[str, Any]
    same_seed: bool


@dataclass(frozen=True)
class RunRequest:
    """One row of a table at a preset, every spec layer applied: `settings` is the run configuration
    mapping each of its seeds is trained with (the seed and the teacher's checkpoint are the planner's)."""

    group: str
    row: str
    model: str
    method: str
    settings: dict[str, Any]
    teacher: TeacherRequest | None = None
    paper: dict[str, float] = field(default_factory=dict)
    metric: str = "student"
    show: dict[str, Any] = field(default_factory=dict)
    group_spec: Group | None = None  # the spec's entries, for the report's size columns
    row_spec: Row | None = None

    @property
    def key(self) -> str:
        return f"{self.group}/{self.row}"


def protocol_settings(spec: Spec, group: Group, preset: str, with_model: bool = True) -> dict[str, Any]:
    """The protocol of a group's runs: `base`, the preset's sections, the group's `config` and its settings
    for the preset. Without `with_model`, the group's own `model` settings are left out: the protocol of the
    rows' teacher (CIRKD's MobileNetV2 group turns the aux head off; its teacher, shared with the ResNet
    groups, keeps the table's)."""
    own = merge(group.config, group.presets.get(preset, {}))
    if not with_model:
        own = {k: v for k, v in own.items() if k != "model"}
    settings = merge(spec.preset_settings(preset), own)
    if spec.plugins:  # every process that trains a run loads them (not part of its key)
        settings["plugins"] = list(spec.plugins)
    return settings


def row_options(spec: Spec, group: Group, row: Row, preset: str) -> dict[str, Any]:
    """A row's method options: the spec's for its method, then the group's, then the preset's, then the row's."""
    return merge(spec.method_options(row.method, group, preset), row.options)


def resolve(spec: Spec, preset: str) -> list[RunRequest]:
    """Every row of the spec (or of its sweeps) at `preset`, in table order."""
    spec.preset(preset)  # an unknown preset: one line naming the spec's
    requests = []
    for group in sweep_groups(spec) if spec.is_sweep else spec.groups:
        protocol = protocol_settings(spec, group, preset)
        for row in group.rows:
            method = {"name": row.method, **row_options(spec, group, row, preset)}
            settings = merge(protocol, {"model": {"name": group.model}, "method": method})
            teacher = None
            if row.teacher:
                # `teacher: <model>` is the table's teacher network, whose own row (Table 2's Teacher) reports
                # that very run; `teacher: true` is "another" copy of the row's network
                name = row.teacher if isinstance(row.teacher, str) else group.model
                same = isinstance(row.teacher, str) or (row.teacher_seed or spec.teacher_seed) == "same"
                teacher_protocol = merge(protocol_settings(spec, group, preset, with_model=False), group.teacher_config)
                teacher = TeacherRequest(name, teacher_protocol, same)
            requests.append(RunRequest(group.name, row.label, group.model, row.method, settings, teacher,
                                       row.paper(), row.metric, dict(row.show), group, row))
    return requests
