"""ERFNet (Romera et al., "ERFNet: Efficient Residual Factorized ConvNet for Real-Time Semantic
Segmentation", IEEE T-ITS 2017), written from the paper's Table I.

Encoder (layers 1-16): downsampler 3->16 | downsampler 16->64, 5 x non-bottleneck-1D (64) |
downsampler 64->128, 2 x non-bottleneck-1D (128) with dilations 2, 4, 8, 16.
Decoder (layers 17-23): upsampler 128->64, 2 x non-bottleneck-1D (64), upsampler 64->16,
2 x non-bottleneck-1D (16), transposed conv 16->C (2x2, stride 2) to full resolution.

`stages` = [16 ch @ /2, 64 ch @ /4, 128 ch @ /8]; the decoder reads only the last one (ERFNet has no
skip connections). `decoder_feature` = the 16-channel map at /2 that the output conv reads.
Dropout (spatial) 0.03 in the 64-channel and 0.3 in the 128-channel layers, as in the paper's code.

The downsampler, upsampler and factorized residual unit are shared with ESNet (`esnet.py`), which
builds on the same blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdesbench.models.realtime import RealtimeSegNet
from sdesbench.models.base import MODELS

BN_EPS = 1e-3


class DownsamplerBlock(nn.Module):
    """ENet-style initial block: 3x3 stride-2 conv (out-in channels) concatenated with 2x2 max pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=True)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], 1)))


class UpsamplerBlock(nn.Module):
    """3x3 transposed conv, stride 2, + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class FactorizedResidual(nn.Module):
    """Residual unit of two factorized (kx1 then 1xk) convolutions: ERFNet's non-bottleneck-1D (k=3)
    and ESNet's FCU (k=3 or 5). The second pair is dilated by `dilation`."""

    def __init__(self, channels: int, kernel: int = 3, dilation: int = 1, dropout: float = 0.0):
        super().__init__()
        p, pd = (kernel - 1) // 2, (kernel - 1) // 2 * dilation
        self.conv_v1 = nn.Conv2d(channels, channels, (kernel, 1), padding=(p, 0), bias=True)
        self.conv_h1 = nn.Conv2d(channels, channels, (1, kernel), padding=(0, p), bias=True)
        self.bn1 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.conv_v2 = nn.Conv2d(channels, channels, (kernel, 1), padding=(pd, 0), dilation=(dilation, 1), bias=True)
        self.conv_h2 = nn.Conv2d(channels, channels, (1, kernel), padding=(0, pd), dilation=(1, dilation), bias=True)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv_h1(F.relu(self.conv_v1(x)))))
        y = self.bn2(self.conv_h2(F.relu(self.conv_v2(y))))
        return F.relu(x + self.dropout(y))


class SymmetricDecoder(nn.Module):
    """ERFNet/ESNet decoder: upsampler 128->64, units at 64, upsampler 64->16, units at 16, then a 2x2
    stride-2 transposed conv to the classes. `unit(channels)` builds one residual unit."""

    def __init__(self, num_classes: int, unit, in_channels: int = 128, units_per_level: int = 2):
        super().__init__()
        self.body = nn.Sequential(
            UpsamplerBlock(in_channels, 64), *[unit(64) for _ in range(units_per_level)],
            UpsamplerBlock(64, 16), *[unit(16) for _ in range(units_per_level)],
        )
        self.classifier = nn.ConvTranspose2d(16, num_classes, 2, stride=2, bias=True)

    def forward(self, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        feat = self.body(stages[-1])
        return {"decoder_feature": feat, "logits": self.classifier(feat)}


def _erfnet_decoder(num_classes: int) -> nn.Module:
    return SymmetricDecoder(num_classes, lambda c: FactorizedResidual(c, 3))


@MODELS.register("erfnet")
def erfnet(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    stages = [
        DownsamplerBlock(3, 16),
        nn.Sequential(DownsamplerBlock(16, 64), *[FactorizedResidual(64, 3, 1, 0.03) for _ in range(5)]),
        nn.Sequential(DownsamplerBlock(64, 128),
                      *[FactorizedResidual(128, 3, d, 0.3) for _ in range(2) for d in (2, 4, 8, 16)]),
    ]
    return RealtimeSegNet("erfnet", num_classes, stages, [16, 64, 128], [2, 4, 8], _erfnet_decoder, 16,
                          pretrained=pretrained, aux=aux)
