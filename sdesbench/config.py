"""The run schema: the typed sections of a run configuration (`RunConfig`), and reading one from YAML
with `--set section.key=value` overrides (`parse_config`).

Its shape is checked by the generic validator (`validate.py`: unknown keys with a did-you-mean, wrong types,
`Literal` choices, non-finite numbers, ranges declared on the field with `field(default=..., metadata=rng(lo,
hi))`), each problem one `ConfigError` line naming the key; the cross-field rules are in `parse_config`.
Names that need the registries (model, dataset, method) and each method's own `Options` (`method.alpha`,
`method.gamma`, ...) are checked one layer up, by `sdesbench.engine.configure.build_config`, which is what
callers use to get a runnable config.

A run's key (`RunConfig.identity_hash`, computed by `identity.py`) covers every field except those marked
`NOT_HASHED`; a field marked `HASHED_WHEN_SET` (a setting added after runs were recorded, e.g. `eval.mode`)
counts only when it is set away from its default, which is what every run recorded before it existed did.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sdesbench.errors import ConfigError
from sdesbench.identity import HASHED_WHEN_SET, NOT_HASHED, identity_of, short_hash
from sdesbench.plugins import load_plugins
from sdesbench.validate import describe, from_dict, rng  # noqa: F401 - rng: the field-range helper methods import from here


Device = str  # auto | cpu | cuda | cuda:N (checked in `parse_config`)
AmpMode = Literal["off", "auto", "bf16", "fp16"]
EvalMode = Literal["whole", "slide"]  # whole images, or mmsegmentation's sliding windows (engine/inference.py)
TtaRule = Literal["mmseg", "mmseg0", "cirkd"]  # how eval.scales / eval.flip views are made and merged (docs/evaluation.md)
EvalResize = Literal["fixed", "keep_ratio"]  # eval.size as the exact [H, W], or as mmcv's keep-ratio scale
Resizer = Literal["auto", "antialias", "cv2"]  # how an evaluation input is resampled (engine/inference.py)
Optimizer = Literal["sgd", "adamw"]  # the student's: SGD with momentum, or AdamW (CIRKD's SegFormer scripts)
AbsentClasses = Literal["skip", "zero"]  # a class in neither labels nor predictions: left out of mIoU, or 0


@dataclass
class ModelConfig:
    name: str = "deeplabv3_resnet18"
    pretrained: bool = False  # ImageNet weights for the backbone (timm cache / hub / `weights`)
    weights: str | None = None  # local file with backbone weights, used when pretrained
    aux: bool = False  # auxiliary FCN head on the penultimate stage (not used by the paper)


@dataclass
class DataConfig:
    name: str = "tiny"
    root: str | None = field(default=None, metadata=NOT_HASHED)  # dataset folder; else $SDESBENCH_DATA/<name>
    crop: list[int] = field(default_factory=lambda: [64, 64])  # training crop H, W
    scale: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random scale range
    flip: bool = True
    batch_size: int = field(default=8, metadata=rng(1))
    workers: int = field(default=0, metadata=rng(0, hash="never"))
    train_split: str = "train"
    eval_split: str = "val"
    check: bool = field(default=True, metadata=NOT_HASHED)  # run the dataset check (cached) before training


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
    # added after runs were recorded: part of a run's key only when set (adamw: torch's AdamW with lr and
    # weight_decay, default betas, momentum unused; CIRKD's `--optimizer-type adamw`)
    optimizer: Optimizer = field(default="sgd", metadata=HASHED_WHEN_SET)
    seed: int = field(default=0, metadata=rng(0))
    checkpoint_every: int = field(default=100, metadata=rng(1, hash="never"))
    # also keep checkpoints/iter_<k>.pt at every multiple k of this (a multiple of checkpoint_every),
    # e.g. to measure loss balance along training (`sdesbench balance`); off by default
    keep_checkpoints_every: int | None = field(default=None, metadata=rng(1, hash="never"))
    # also keep checkpoints/best.pt: the weights of the best periodic evaluation (`eval.every`; the record's
    # `best`), for `report --checkpoint best` and `eval`. Not in the key: it changes no trained number, only
    # which weights are kept (the training is bitwise the same with it, a test checks)
    keep_best: bool = field(default=False, metadata=NOT_HASHED)
    log_every: int = field(default=10, metadata=rng(1, hash="never"))
    # hooks added to the built-in ones, by registered name (or {name: ..., <option>: ...}), checked and resolved by
    # `engine.configure.build_config` (engine/hook_registry.py). Not in the key: a hook never changes the step
    hooks: list[str | dict[str, Any]] = field(default_factory=list, metadata=NOT_HASHED)
    device: Device = field(default="auto", metadata=NOT_HASHED)
    amp: AmpMode = "off"  # CUDA only; auto = bf16 where supported, fp16 + GradScaler otherwise
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = True
    sync_bn: bool = False  # SyncBatchNorm under DDP
    # under torchrun: how long a collective may wait for the other ranks before the run fails (a rank that hangs
    # or died); torch's own default. Not in the key: it changes no trained number (docs/performance.md)
    dist_timeout_s: float = field(default=1800.0, metadata=rng(1.0, hash="never"))


@dataclass
class EvalConfig:
    batch_size: int = field(default=1, metadata=rng(1))
    max_images: int | None = field(default=None, metadata=rng(1))
    # inference on the image resized by `scale` (or to `size` = [H, W]); logits are resized back and
    # scored at the label's size. 1.0 = the paper's whole image as it is. `size` excludes scale != 1.
    scale: float = field(default=1.0, metadata=rng(0.01, doc="input scale for inference"))
    size: list[int] | None = None
    # periodic validation every `every` iterations (and at the last one) on the first `every_max_images`
    # images of the evaluation set: a curve and a `best` beside the table's final-iteration metric. It
    # changes nothing in the training (engine/hooks.py), so neither field is part of the run's hash.
    every: int | None = field(default=None, metadata=rng(1, doc="iterations between periodic evaluations",
                                                         hash="never"))
    every_max_images: int | None = field(default=None, metadata=rng(1, hash="never"))
    # DataLoader workers decoding the evaluation images (None: data.workers); never changes a result
    workers: int | None = field(default=None, metadata=rng(0, hash="never"))
    # The settings below came after runs were recorded: each is part of the run key only when set to another
    # value than its default (HASHED_WHEN_SET), so the defaults keep every recorded run current. They are
    # described, with their references, in docs/evaluation.md and `engine/inference.py`.
    # whole: one pass per view; slide: mmsegmentation's sliding windows of `crop` [H, W] every `stride` [H, W]
    mode: EvalMode = field(default="whole", metadata=HASHED_WHEN_SET)
    crop: list[int] | None = field(default=None, metadata=HASHED_WHEN_SET)
    stride: list[int] | None = field(default=None, metadata=HASHED_WHEN_SET)
    # test-time augmentation: one view per scale (relative to the inference size above), and each mirrored
    # with `flip`; merged by `tta_rule` (mmseg: mean of softmax probabilities; cirkd: mean of logits)
    scales: list[float] | None = field(default=None, metadata=HASHED_WHEN_SET)
    flip: bool = field(default=False, metadata=HASHED_WHEN_SET)
    tta_rule: TtaRule = field(default="mmseg", metadata=HASHED_WHEN_SET)
    # a class in neither the labels nor the predictions of the evaluated set: left out of the mIoU mean (skip,
    # mmsegmentation) or counted as 0 (zero, CIRKD's SegmentationMetric)
    absent_classes: AbsentClasses = field(default="skip", metadata=HASHED_WHEN_SET)
    # fixed: eval.size is the input's [H, W]; keep_ratio: eval.size is mmcv's scale (e.g. [2048, 512]), each image
    # resized to fit it keeping its aspect ratio (mmcv's rounding), scored at its own size, labels never resized
    resize: EvalResize = field(default="fixed", metadata=HASHED_WHEN_SET)
    # the image resampler: cv2 (mmcv's INTER_LINEAR on the uint8 image, no antialiasing), antialias (the suite's
    # bilinear of the training rescale), auto: cv2 where mmsegmentation's pipeline resizes (keep_ratio, the
    # mmseg / mmseg0 views of test-time augmentation), antialias for eval.scale / a fixed eval.size
    resizer: Resizer = field(default="auto", metadata=HASHED_WHEN_SET)

    def loader_workers(self, data: DataConfig) -> int:
        return data.workers if self.workers is None else self.workers

    @property
    def tta(self) -> bool:
        """Whether test-time augmentation is asked for (several views per image)."""
        return self.scales is not None or self.flip


LoggerName = Literal["jsonl", "tensorboard", "mlflow", "wandb"]  # where a run's measurements go (engine/loggers.py)


@dataclass
class OutputConfig:
    dir: str = "results/runs/default"
    # log.jsonl, TensorBoard event files, MLflow, Weights & Biases: each gets the scalars of every logged iteration
    # and evaluation, the resolved configuration, the run's key and table/row, and the final metrics
    loggers: list[LoggerName] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    # the table, preset and row ("<group>/<row>", "teacher:<model>") `sdesbench run` planned the run for
    # (experiments/plan.py): the loggers' project, group and run name
    table: str | None = None
    preset: str | None = None
    row: str | None = None


def tensorboard_flag(data: dict[str, Any]) -> dict[str, Any]:
    """`output.tensorboard`, which `output.loggers` replaced (every older config.yaml and record has it), read as
    the loggers it meant: true the default ones, false the default without tensorboard."""
    output = data.get("output")
    if not isinstance(output, dict) or "tensorboard" not in output:
        return data
    output = dict(output)
    flag = output.pop("tensorboard")
    if not isinstance(flag, bool):
        raise ConfigError(f"output.tensorboard: expected true/false, got {describe(flag)} (output.loggers replaces it)")
    loggers = output.get("loggers")
    if loggers is None:
        output["loggers"] = [n for n in OutputConfig().loggers if flag or n != "tensorboard"]
    elif not isinstance(loggers, list) or ("tensorboard" in loggers) != flag:
        raise ConfigError(f"output.tensorboard={str(flag).lower()} contradicts output.loggers={loggers}: "
                          "output.loggers replaces output.tensorboard, leave it out")
    return {**data, "output": output}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig, metadata=NOT_HASHED)
    # the settings the spec, the config file or the command line named, as identity keys (`train.lr`,
    # `method.options.tau`) -> resolved values; the rest are defaults. Two records of the same request with
    # different keys: a default changed in between (experiments/plan.py marks the older one stale)
    request: dict[str, Any] = field(default_factory=dict, metadata=NOT_HASHED)
    # plugins to load before the names are looked up (sdesbench/plugins.py): .py paths (stored resolved, so the
    # run's config.yaml trains it again from anywhere) or module names. Not part of the key by itself: a
    # built-in row run beside a plugin keeps its hash
    plugins: list[str] = field(default_factory=list, metadata=NOT_HASHED)
    # file or module name -> sha256 of its source, for each plugin the run's model, dataset, method or teacher
    # comes from (filled by `engine.configure.validate`): other plugin source is another run, and the older
    # record is stale, as under a changed default
    plugin_sha256: dict[str, str] = field(default_factory=dict, metadata=HASHED_WHEN_SET)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """Everything that changes what is trained or measured, as nested dicts: every field at its value,
        defaults included, except the NOT_HASHED ones (where and how a run is written, logged, loaded) and the
        HASHED_WHEN_SET ones at their default (settings added after runs were recorded: their default is what
        every older run did, so it must not change an older run's key).
        Method options are whatever `method.options` holds: `engine.configure.build_config` fills in every
        option the method resolves, so the identity of a runnable config is the resolved one."""
        return identity_of(self)

    def identity_hash(self) -> str:
        """The run key: a hash of `identity()` (docs/tables.md, "What a run's key covers")."""
        return short_hash(self.identity())

    def evaluation_identity(self, split: str) -> dict[str, Any]:
        """What names the numbers of one evaluation of a trained run: the split and every eval setting that
        changes a number (the eval section's identity without `batch_size`, which never does), for the records of
        `sdesbench eval --record` (`<run>/evaluations/<evaluation_key>.json`)."""
        return {"split": split, "eval": {k: v for k, v in identity_of(self.eval).items() if k != "batch_size"}}

    def evaluation_key(self, split: str) -> str:
        return short_hash(self.evaluation_identity(split))


def _mapping_sections() -> tuple[str, ...]:
    """The top-level keys of a run configuration whose value is a mapping (a section dataclass or a dict)."""
    hints = typing.get_type_hints(RunConfig)
    return tuple(f.name for f in dataclasses.fields(RunConfig)
                 if dataclasses.is_dataclass(hints[f.name]) or typing.get_origin(hints[f.name]) is dict)


MAPPING_SECTIONS = _mapping_sections()  # a section given as a scalar or list is one line naming it (`parse_config`)


def method_section(d: Any) -> dict[str, Any]:
    """YAML writes method options flat (`method: {name: sdes, alpha: 0.5}`); store them nested."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"method: expected a mapping, got {describe(d)}")
    d = dict(d)
    options = d.pop("options", {}) or {}
    if not isinstance(options, dict):
        raise ConfigError(f"method.options: expected a mapping, got {describe(options)}")
    options = dict(options)
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


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """`--set section.key=value` values written into a config mapping (method options nested)."""
    data = dict(data)
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
    return data


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options":
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None,
                 relative_to: str | Path | None = None, with_plugins: bool = True) -> RunConfig:
    """Dict (from YAML / a spec) + `--set` overrides -> a RunConfig whose shape is checked, its `plugins`
    loaded (a relative path is relative to `relative_to`, the config file's folder, else the current one)
    and stored resolved. `with_plugins=False` reads a stored record's configuration without importing its
    plugins (comparing keys needs none of their code).

    Registry names and method options are not checked here (see `engine.configure.build_config`).
    """
    data = dict(data or {})
    for section, value in data.items():  # `model: resnet` or `data: [tiny]`: say which section is wrong
        if section in MAPPING_SECTIONS and value is not None and not isinstance(value, dict):
            raise ConfigError(f"{section}: expected a mapping, got {describe(value)}")
    if "method" in data:
        data["method"] = method_section(data["method"])
    cfg = from_dict(RunConfig, tensorboard_flag(apply_overrides(data, overrides)))
    if with_plugins:
        cfg.plugins = [p.target for p in load_plugins(cfg.plugins, relative_to)]
    if len(cfg.data.crop) != 2 or min(cfg.data.crop) < 8:
        raise ConfigError(f"data.crop must be [H, W] with both >= 8, got {cfg.data.crop}")
    if len(cfg.data.scale) != 2 or not 0 < cfg.data.scale[0] <= cfg.data.scale[1]:
        raise ConfigError(f"data.scale must be [min, max] with 0 < min <= max, got {cfg.data.scale}")
    if cfg.eval.size is not None and (len(cfg.eval.size) != 2 or min(cfg.eval.size) < 8):
        raise ConfigError(f"eval.size must be [H, W] with both >= 8, got {cfg.eval.size}")
    if cfg.eval.size is not None and cfg.eval.scale != 1.0:
        raise ConfigError(f"eval.size={cfg.eval.size} and eval.scale={cfg.eval.scale} exclude each other; set one")
    check_eval_views(cfg.eval)
    keep, every = cfg.train.keep_checkpoints_every, cfg.train.checkpoint_every
    if keep is not None and keep % every:
        raise ConfigError(f"train.keep_checkpoints_every={keep} must be a multiple of train.checkpoint_every={every}")
    if cfg.train.keep_best and not cfg.eval.every:
        raise ConfigError("train.keep_best keeps the best periodic evaluation's weights: set eval.every too")
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    return cfg


def check_eval_views(ev: EvalConfig) -> None:
    """The sliding-window and test-time-augmentation settings of `eval` fit together (one line otherwise)."""
    if ev.mode == "slide":
        for key, value in (("crop", ev.crop), ("stride", ev.stride)):
            if value is None or len(value) != 2 or min(value) < 1:
                raise ConfigError(f"eval.mode=slide needs eval.{key} = [H, W] (positive), got {value}")
        if ev.stride[0] > ev.crop[0] or ev.stride[1] > ev.crop[1]:
            raise ConfigError(f"eval.stride={ev.stride} exceeds eval.crop={ev.crop}: pixels between two windows "
                              "would get no prediction")
        if ev.tta and ev.tta_rule == "cirkd":
            raise ConfigError("eval.tta_rule=cirkd follows CIRKD's eval.py, which has no sliding window; use "
                              "eval.tta_rule=mmseg with eval.mode=slide")
    elif ev.crop is not None or ev.stride is not None:
        raise ConfigError("eval.crop and eval.stride apply to eval.mode=slide")
    if ev.scales is not None and (not ev.scales or min(ev.scales) <= 0):
        raise ConfigError(f"eval.scales must be a non-empty list of positive factors, got {ev.scales}")
    if ev.resize == "keep_ratio" and ev.size is None:
        raise ConfigError("eval.resize=keep_ratio needs eval.size = mmcv's scale, e.g. [2048, 512] (the longer side "
                          "fits the larger number, the shorter side the smaller)")


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: unreadable ({type(e).__name__})") from None
    return parse_yaml(text, str(p))


def parse_yaml(text: str, where: str) -> dict[str, Any]:
    """A YAML mapping (a config, a table spec); `where` names it in the one-line errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return data or {}
