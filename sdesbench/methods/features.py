"""What a method on feature maps needs: the names of the maps it may distil (`FeatureMap`), reading one from a
model output dict (`feature_map`), its channel count in the student and the teacher, the trainable 1x1 adapter
between them (`channel_adapter`), and the one way to add CIRKD's pixel KD term to a method (`PixelKD`).

Not a method itself (registers nothing); the feature methods use it, and so may a plugin (docs/extending.md,
"Feature maps and adapters").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from sdesbench.errors import ConfigError
from sdesbench.methods.base import MethodContext
from sdesbench.methods.kl import KLOptions, kd_term

# the maps of the output dict (sdesbench.models.base) a method distils: the logits, the feature the classifier
# reads, or the encoder's last stage. An option offering fewer declares its own Literal of these names.
FeatureMap = Literal["logits", "decoder_feature", "last_stage"]
AdapterMode = Literal["auto", "always", "never"]  # 1x1 conv student->teacher channels; auto: when counts differ


def feature_map(out: dict[str, Any], name: FeatureMap) -> torch.Tensor:
    """The map `name` of model output dict `out`."""
    if name == "last_stage":
        return out["stages"][-1]
    return out[name]


def map_channels(model: Any, name: FeatureMap, num_classes: int) -> int:
    """Channels of the map `name` of a SegmentationModel."""
    if name == "logits":
        return num_classes
    if name == "decoder_feature":
        return model.decoder_channels
    return model.stage_channels[-1]


def student_and_teacher_channels(ctx: MethodContext, name: FeatureMap) -> tuple[int, int]:
    """Channels of map `name` in the student and in the teacher (the student's when no teacher is built)."""
    s_ch = map_channels(ctx.model, name, ctx.num_classes)
    t_ch = map_channels(ctx.teacher, name, ctx.num_classes) if ctx.teacher is not None else s_ch
    return s_ch, t_ch


def channel_adapter(student_channels: int, teacher_channels: int, mode: AdapterMode = "always",
                    option: str = "adapter", target: str = "the distilled map") -> nn.Conv2d | None:
    """The trainable 1x1 convolution without bias from the student's to the teacher's channels, as CIRKD's
    FitNet and CWD build theirs: built when `mode` is `always`, or `auto` and the counts differ (else None);
    `never` with differing counts is a one-line error naming `option` (the method's option that chose the mode)
    and the distilled map `target`. Made in a method's `__init__`, it is a module of the method: trained with
    the student, never part of it."""
    if mode == "always" or (mode == "auto" and student_channels != teacher_channels):
        return nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
    if student_channels != teacher_channels:
        raise ConfigError(f"method.{option}=never but {target} has {student_channels} student and "
                          f"{teacher_channels} teacher channels")
    return None


class PixelKD:
    """Adds the pixel-wise KD term of `kl` (`kd`, options `kd_*`; Hinton et al. 2015) after a method's own terms
    at every iteration: CIRKD's `--lambda-kd` on top of a method. The one way to make a "+kd" composite: put it
    first among the bases and register the class,

        @METHODS.register("fitnet+kd")
        class FitNetKD(PixelKD, FitNet):
            logged_terms = FitNet.logged_terms + ("kd",)

    Its `Options` become `KLOptions` + the method's (made here, unless the class declares them with KLOptions)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not issubclass(cls.Options, KLOptions):
            options = type("Options", (KLOptions, cls.Options), {"__module__": cls.__module__,
                                                                "__qualname__": f"{cls.__qualname__}.Options"})
            cls.Options = dataclass(options)

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        terms = super().loss_terms(student_out, labels, step, teacher_out)
        terms["kd"] = kd_term(self.opts, student_out["logits"], teacher_out["logits"], labels)
        return terms
