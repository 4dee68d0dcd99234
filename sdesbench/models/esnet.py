"""ESNet (Wang et al., "ESNet: An Efficient Symmetric Network for Real-time Semantic Segmentation",
PRCV 2019, arXiv:1906.09826), written from that paper.

The SDES paper cites "ESNet" as Lyu et al. (ICIP 2019, "ESNet: Edge-based segmentation network"),
but its figures (1.66 M, 24.35 G at 512x1024) are those of Wang et al.'s symmetric ESNet (1.66 M in
that paper), the ESNet of the common public real-time segmentation codebases; the edge-based
network of Lyu et al. is a different design with an edge branch, and its code is not public.
See docs/models.md.

Encoder: downsampler 3->16, 3 x FCU(16, k=3) | downsampler 16->64, 2 x FCU(64, k=5) |
downsampler 64->128, 3 x PFCU(128, dilations 2, 5, 9).
Decoder (symmetric): upsampler 128->64, 2 x FCU(64, k=5), upsampler 64->16, 2 x FCU(16, k=3),
transposed conv 16->C (2x2, stride 2).
`stages` = [16 ch @ /2, 64 ch @ /4, 128 ch @ /8]; `decoder_feature` = the 16-channel map at /2.
Dropout 0.03 in the encoder FCUs, 0.3 in the PFCUs, none in the decoder.
Choice: each PFCU branch has its own BatchNorm (the paper draws three independent branches; a public
implementation shares one BN between them, 512 parameters fewer per PFCU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdesbench.models.erfnet import BN_EPS, DownsamplerBlock, FactorizedResidual, SymmetricDecoder
from sdesbench.models.realtime import RealtimeSegNet
from sdesbench.models.base import MODELS


class PFCU(nn.Module):
    """Parallel factorized convolution unit: a 3x1/1x3 pair, then three dilated 3x1/1x3 branches
    (dilations 2, 5, 9) summed with the input."""

    def __init__(self, channels: int, dilations: tuple[int, ...] = (2, 5, 9), dropout: float = 0.3):
        super().__init__()
        self.conv_v = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0), bias=True)
        self.conv_h = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1), bias=True)
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, (3, 1), padding=(d, 0), dilation=(d, 1), bias=True), nn.ReLU(),
                nn.Conv2d(channels, channels, (1, 3), padding=(0, d), dilation=(1, d), bias=True),
                nn.BatchNorm2d(channels, eps=BN_EPS), nn.Dropout2d(dropout),
            ) for d in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv_h(F.relu(self.conv_v(x)))))
        out = x
        for branch in self.branches:
            out = out + branch(y)
        return F.relu(out)


def _esnet_unit(channels: int) -> nn.Module:
    return FactorizedResidual(channels, 5 if channels == 64 else 3)


def _esnet_decoder(num_classes: int) -> nn.Module:
    return SymmetricDecoder(num_classes, _esnet_unit)


@MODELS.register("esnet")
def esnet(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    stages = [
        nn.Sequential(DownsamplerBlock(3, 16), *[FactorizedResidual(16, 3, 1, 0.03) for _ in range(3)]),
        nn.Sequential(DownsamplerBlock(16, 64), *[FactorizedResidual(64, 5, 1, 0.03) for _ in range(2)]),
        nn.Sequential(DownsamplerBlock(64, 128), *[PFCU(128) for _ in range(3)]),
    ]
    return RealtimeSegNet("esnet", num_classes, stages, [16, 64, 128], [2, 4, 8], _esnet_decoder, 16,
                          pretrained=pretrained, aux=aux)
