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

    `stage_channels` / `stage_strides` describe the output of each encoder stage; the input height and
    width must be multiples of the last stride.
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

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        stride = self.stage_strides[-1]
        if x.shape[-2] % stride or x.shape[-1] % stride:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be a multiple of {stride}")
        stages = []
        for stage in self.encoder:
            x = stage(x)
            stages.append(x)
        return stages

    def build_decoder(self, num_classes: int) -> nn.Module:
        return self._make_decoder(num_classes)
