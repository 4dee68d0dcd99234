"""Shared frame of the hand-written real-time networks (ENet, ERFNet, ESNet).

Each of them is an encoder made of a few stages (each stage one `nn.Module`, run in order; the
output of every stage is one entry of `stages`) and a decoder that reads `stages` and returns
{"decoder_feature", "logits"}. Their decoders end with a transposed conv to full resolution, so the
logits already come at input size (the base `forward` then does not resample them).

These networks have no ImageNet weights: asking for them fails with one line instead of
silently training from a random init that would be recorded as pretrained.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.fcn import FCNHead

from sdesbench.errors import ConfigError
from sdesbench.models.base import SegmentationModel


def reject_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ConfigError(f"model.pretrained: {name} is written in this project and has no ImageNet weights; "
                          f"set model.pretrained=false (the paper trains it from scratch)")


class RealtimeSegNet(SegmentationModel):
    """Encoder stages + a decoder built by `make_decoder(num_classes)`.

    `stage_channels` / `stage_strides` describe the output of each encoder stage (for an input whose
    height and width are multiples of the last stride).
    """

    def __init__(self, name: str, num_classes: int, encoder_stages: list[nn.Module], stage_channels: list[int],
                 stage_strides: list[int], make_decoder: Callable[[int], nn.Module], decoder_channels: int,
                 pretrained: bool = False, aux: bool = False):
        super().__init__()
        reject_pretrained(name, pretrained)
        self.num_classes = num_classes
        self.pretrained = False
        self.encoder = nn.ModuleList(encoder_stages)
        self.stage_channels = list(stage_channels)
        self.stage_strides = list(stage_strides)
        self.decoder_channels = decoder_channels
        self._make_decoder = make_decoder
        self.decoder = make_decoder(num_classes)
        self.aux_head = FCNHead(self.stage_channels[-2], num_classes) if aux else None

    def forward(self, x: torch.Tensor) -> dict:
        """Inputs whose size is not a multiple of the deepest stride (e.g. evaluation images) are
        zero-padded at the bottom/right and the logits cropped back; `stages` are then those of the
        padded image."""
        stride = self.stage_strides[-1]
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % stride, -w % stride
        if not (pad_h or pad_w):
            return super().forward(x)
        out = super().forward(F.pad(x, (0, pad_w, 0, pad_h)))
        out["logits"] = out["logits"][..., :h, :w]
        if out["aux"] is not None:
            out["aux"] = out["aux"][..., :h, :w]
        return out

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = []
        for stage in self.encoder:
            x = stage(x)
            stages.append(x)
        return stages

    def build_decoder(self, num_classes: int) -> nn.Module:
        return self._make_decoder(num_classes)
