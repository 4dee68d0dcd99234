"""Typed run configuration: dataclasses loaded from YAML, with `--set section.key=value` overrides.

Every value is checked up front (unknown key, wrong type, out-of-range value) and a bad one
raises `ConfigError` with one line naming the key. Ranges are declared on the field itself:
`field(default=..., metadata={"range": (lo, hi)})`, inclusive, either bound may be None.

Method-specific options (`method.alpha`, `method.gamma`, ...) are declared by each method as its
own `Options` dataclass and validated with the same machinery (see `sdesbench.methods.base`).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from sdesbench.errors import ConfigError


def rng(lo: float | None = None, hi: float | None = None, doc: str = "") -> dict[str, Any]:
    """Field metadata: inclusive numeric range plus a one-line description."""
    return {"range": (lo, hi), "doc": doc}


@dataclass
class ModelConfig:
    name: str = "deeplabv3_resnet18"
    pretrained: bool = False  # ImageNet weights for the backbone (timm cache / hub / `weights`)
    weights: str | None = None  # local file with backbone weights, used when pretrained
    aux: bool = False  # auxiliary FCN head on the penultimate stage (not used by the paper)


@dataclass
class DataConfig:
    name: str = "tiny"
    root: str | None = None  # dataset folder; falls back to $SDESBENCH_DATA/<name>
    crop: list[int] = field(default_factory=lambda: [64, 64])  # training crop H, W
    scale: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random scale range
    flip: bool = True
    batch_size: int = field(default=8, metadata=rng(1))
    workers: int = field(default=0, metadata=rng(0))
    train_split: str = "train"
    eval_split: str = "val"
    check: bool = True  # run the dataset check (cached) before training


@dataclass
class MethodConfig:
    name: str = "student"
    options: dict[str, Any] = field(default_factory=dict)  # validated by the method's Options


@dataclass
class TeacherConfig:
    model: str | None = None  # registry name of the teacher architecture
    checkpoint: str | None = None  # trained teacher checkpoint (`sdesbench run` fills it in)


@dataclass
class TrainConfig:
    iters: int = field(default=300, metadata=rng(1, doc="training iterations"))
    lr: float = field(default=0.01, metadata=rng(0.0))
    momentum: float = field(default=0.9, metadata=rng(0.0, 1.0))
    weight_decay: float = field(default=1e-4, metadata=rng(0.0))
    poly_power: float = field(default=0.9, metadata=rng(0.0))
    seed: int = field(default=0, metadata=rng(0))
    checkpoint_every: int = field(default=100, metadata=rng(1))
    # also keep checkpoints/iter_<k>.pt at every multiple k of this (a multiple of checkpoint_every),
    # e.g. to measure loss balance along training (`sdesbench balance`); off by default
    keep_checkpoints_every: int | None = field(default=None, metadata=rng(1))
    log_every: int = field(default=10, metadata=rng(1))
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "off"  # off | auto | bf16 | fp16 (CUDA only)
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = True
    sync_bn: bool = False  # SyncBatchNorm under DDP


@dataclass
class EvalConfig:
    batch_size: int = field(default=1, metadata=rng(1))
    max_images: int | None = field(default=None, metadata=rng(1))
    # inference on the image resized by `scale` (or to `size` = [H, W]); logits are resized back and
    # scored at the label's size. 1.0 = the paper's whole image as it is. `size` excludes scale != 1.
    scale: float = field(default=1.0, metadata=rng(0.01, doc="input scale for inference"))
    size: list[int] | None = None


@dataclass
class OutputConfig:
    dir: str = "results/runs/default"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity_hash(self) -> str:
        """Hash of everything that changes the result (not where it is written, nor logging)."""
        d = self.to_dict()
        d.pop("output")
        for k in ("log_every", "checkpoint_every", "keep_checkpoints_every", "device"):
            d["train"].pop(k)
        for k, default in (("scale", 1.0), ("size", None)):  # added later: at their defaults a run keeps its hash
            if d["eval"][k] == default:
                d["eval"].pop(k)
        d["data"].pop("workers")
        d["data"].pop("check")
        d["data"].pop("root")
        blob = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float, tuples to lists)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (list, tuple):
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value, value]  # `crop: 64` means 64x64
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    return value


def check_range(value: Any, f: dataclasses.Field, key: str) -> None:
    lo, hi = f.metadata.get("range", (None, None))
    if value is None or isinstance(value, (list, dict, str)):
        return
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{key}={value} is out of range {bounds}")


def from_dict(cls: Any, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[key] = coerce(value, hints[key], full)
        check_range(kwargs[key], fields[key], full)
    return cls(**kwargs)


def _method_section(d: dict[str, Any]) -> dict[str, Any]:
    """YAML writes method options flat (`method: {name: sdes, alpha: 0.5}`); store them nested."""
    d = dict(d or {})
    options = dict(d.pop("options", {}) or {})
    name = d.pop("name", "student")
    options.update(d)
    return {"name": name, "options": options}


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string; a user means the number
        try:
            value = float(value) if not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            pass
    return parts, value


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Dict (from YAML / a spec) + `--set` overrides -> validated RunConfig (method options too)."""
    data = dict(data or {})
    if "method" in data:
        data["method"] = _method_section(data["method"])
    for text in overrides or []:
        parts, value = parse_override(text)
        if parts[0] == "method" and parts[1] not in ("name", "options"):
            parts = ["method", "options", *parts[1:]]
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{p}' is not a section")
        node[parts[-1]] = value
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data or {}


def validate(cfg: RunConfig) -> None:
    """Cross-field checks and name lookups that need the registries."""
    from sdesbench.registry import DATASETS, METHODS, MODELS

    MODELS.get(cfg.model.name)
    DATASETS.get(cfg.data.name)
    method_cls = METHODS.get(cfg.method.name)
    method_cls.parse_options(cfg.method.options, num_classes=DATASETS.get(cfg.data.name).num_classes)
    if len(cfg.data.crop) != 2 or min(cfg.data.crop) < 8:
        raise ConfigError(f"data.crop must be [H, W] with both >= 8, got {cfg.data.crop}")
    if len(cfg.data.scale) != 2 or not 0 < cfg.data.scale[0] <= cfg.data.scale[1]:
        raise ConfigError(f"data.scale must be [min, max] with 0 < min <= max, got {cfg.data.scale}")
    if cfg.eval.size is not None and (len(cfg.eval.size) != 2 or min(cfg.eval.size) < 8):
        raise ConfigError(f"eval.size must be [H, W] with both >= 8, got {cfg.eval.size}")
    if cfg.eval.size is not None and cfg.eval.scale != 1.0:
        raise ConfigError(f"eval.size={cfg.eval.size} and eval.scale={cfg.eval.scale} exclude each other; set one")
    keep, every = cfg.train.keep_checkpoints_every, cfg.train.checkpoint_every
    if keep is not None and keep % every:
        raise ConfigError(f"train.keep_checkpoints_every={keep} must be a multiple of train.checkpoint_every={every}")
    if cfg.train.amp not in ("off", "auto", "bf16", "fp16"):
        raise ConfigError(f"train.amp must be off, auto, bf16 or fp16, got {cfg.train.amp!r}")
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    if method_cls.needs_teacher and not cfg.teacher.model:
        raise ConfigError(f"method {cfg.method.name!r} needs a teacher: set teacher.model (and teacher.checkpoint)")
    if cfg.teacher.model:
        MODELS.get(cfg.teacher.model)
