"""The model contract every segmentation network in the suite follows.

A model is an encoder (`encode`: image -> list of per-stage feature maps, shallow to deep) and a
decoder module (`self.decoder`: stages -> {"decoder_feature", "logits"} at feature resolution).
`forward` returns one dict, the same for every model:

- ``logits``: B x C x H x W, upsampled to the input size
- ``aux``: auxiliary logits at input size, or None when the model has no auxiliary head
- ``decoder_feature``: the feature map the classifier reads (B x D x h x w)
- ``stages``: list of encoder stage features, shallow to deep (the last one is what the decoder reads)

Methods that need a second decoder of the same architecture (SDES experts of type `student`)
call `build_decoder(num_classes)`, which returns a fresh, independently initialised decoder that
accepts the same `stages` list.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdesbench.registry import Registry

MODELS = Registry("model")


class SegmentationModel(nn.Module):
    num_classes: int
    stage_channels: list[int]  # channels of each entry of `stages`
    stage_strides: list[int]  # input-size / stage-size of each entry of `stages`
    decoder_channels: int  # channels of `decoder_feature`
    pretrained: bool = False  # whether the backbone was initialised from ImageNet weights
    decoder: nn.Module
    # no class-level default: a class attribute `aux_head = None` would shadow the submodule that
    # nn.Module registers in `_modules`, so the head would never run; read it with getattr(..., None)
    aux_head: nn.Module | None

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def build_decoder(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
        size = x.shape[-2:]
        stages = self.encode(x)
        dec = self.decoder(stages)
        aux = None
        aux_head = getattr(self, "aux_head", None)  # set by models built with aux=True
        if aux_head is not None:
            aux = to_size(aux_head(stages[-2]), size)
        return {
            "logits": to_size(dec["logits"], size),
            "aux": aux,
            "decoder_feature": dec["decoder_feature"],
            "stages": stages,
        }


def to_size(logits: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of a B x C x h x w map (logits, attention, features) to `size`; a map already
    at that size (decoders ending at full resolution) is returned as it is, so no identity resize is
    run or counted in FLOPs."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
