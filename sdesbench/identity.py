"""Run identity: which configuration fields name a run, and the short hash of them (a run's key).

A field's metadata says how it counts: `NOT_HASHED` fields never (where and how a run is written, logged,
loaded), `HASHED_WHEN_SET` fields only when set away from their default (settings added after runs were recorded:
their default is what every older run did), every other field always (docs/tables.md, "What a run's key
covers"). `RunConfig.identity_hash` (config.py) is `short_hash(identity_of(cfg))`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

# field metadata for identity_hash: never part of a run's identity (where/how it is written, not what)
NOT_HASHED = {"hash": "never"}
# field metadata for identity_hash: part of a run's identity only when set to another value than its default. A
# setting added after runs were recorded gets it, so that its default keeps every existing run key (and the
# committed records under results/runs) current, while any other value names another run (docs/tables.md,
# "What a run's key covers")
HASHED_WHEN_SET = {"hash": "when_set"}


def short_hash(tree: Any) -> str:
    blob = json.dumps(tree, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def identity_of(obj: Any) -> Any:
    """A dataclass (nested ones too) as dicts of its identity fields (`in_identity`); other values as they are."""
    if not dataclasses.is_dataclass(obj):
        return obj
    return {f.name: identity_of(getattr(obj, f.name)) for f in dataclasses.fields(obj) if in_identity(f, getattr(obj, f.name))}


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def in_identity(f: dataclasses.Field, value: Any) -> bool:
    """Whether a field's value is part of the run's identity: never for NOT_HASHED fields, only away from its
    default for HASHED_WHEN_SET ones, always otherwise."""
    rule = f.metadata.get("hash")
    return rule != "never" and not (rule == "when_set" and value == field_default(f))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `section.key` -> value (lists and other values are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def identity_changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, before, after) for every identity key whose value differs (`None` stands for an absent key)."""
    a, b = flatten(before), flatten(after)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
