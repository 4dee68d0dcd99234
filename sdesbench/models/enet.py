"""ENet (Paszke et al., "ENet: A Deep Neural Network Architecture for Real-Time Semantic
Segmentation", arXiv:1606.02147, 2016), written from the paper's Table 1 and Section 3.

Initial block (3x3 stride-2 conv with 13 filters concatenated with 2x2 max pooling -> 16 @ /2);
stage 1: downsampling bottleneck 16->64, 4 regular bottlenecks; stages 2 and 3: (stage 2 only)
downsampling bottleneck 64->128, then regular, dilated 2, asymmetric 5, dilated 4, regular,
dilated 8, asymmetric 5, dilated 16; stage 4: upsampling bottleneck 128->64, 2 regular;
stage 5: upsampling bottleneck 64->16, 1 regular; full conv: 3x3 stride-2 transposed conv 16->C.
Bottlenecks: 1x1 projection to a quarter of the output channels (2x2 stride-2 conv when
downsampling), the main conv, 1x1 expansion, BN after each conv, no biases, spatial dropout 0.01
(stage 1) / 0.1 (after); PReLU in the encoder, ReLU in the decoder (as in the authors' Torch code).

`stages` = [initial 16 @ /2, stage 1 64 @ /4, stage 2 128 @ /8, stage 3 128 @ /8].
`decoder_feature` = the 16-channel map at /2 that the full conv reads.

Max-unpooling in a rebuilt decoder: ENet's upsampling bottlenecks unpool with the indices of the
matching downsampling max-pool. The pooling (2x2, stride 2, as in the paper) is a deterministic
function of the downsampling bottleneck's *input*, which is an entry of `stages` (stages[0] for
stage 1, stages[1] for stage 2). The decoder therefore recomputes the indices from `stages`
(`F.max_pool2d(..., return_indices=True)`, the same indices the encoder used), so `stages` holds only
feature maps and any decoder from `build_decoder` works from `stages` alone. The extra max-pool is
cheap (and fvcore counts no FLOPs for it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdesbench.models.realtime import RealtimeSegNet
from sdesbench.models.base import MODELS


def _bn_act(channels: int, prelu: bool) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.PReLU() if prelu else nn.ReLU()]


class InitialBlock(nn.Module):
    def __init__(self, out_channels: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(3, out_channels - 3, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn_act = nn.Sequential(*_bn_act(out_channels, True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_act(torch.cat([self.conv(x), self.pool(x)], 1))


class Bottleneck(nn.Module):
    """Regular / dilated / asymmetric bottleneck (no change of size or channels)."""

    def __init__(self, channels: int, kind: str = "regular", dilation: int = 1, dropout: float = 0.1,
                 prelu: bool = True):
        super().__init__()
        mid = channels // 4
        if kind == "asymmetric":
            main = [nn.Conv2d(mid, mid, (5, 1), padding=(2, 0), bias=False),
                    nn.Conv2d(mid, mid, (1, 5), padding=(0, 2), bias=False)]
        else:
            main = [nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation, bias=False)]
        self.ext = nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=False), *_bn_act(mid, prelu),
            *main, *_bn_act(mid, prelu),
            nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.Dropout2d(dropout),
        )
        self.act = nn.PReLU() if prelu else nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.ext(x))


class DownsamplingBottleneck(nn.Module):
    """Main branch: 2x2 max pooling, zero-padded to the output channels; extension: 2x2 stride-2
    projection, 3x3 conv, 1x1 expansion."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        mid = out_channels // 4
        self.extra_channels = out_channels - in_channels
        self.ext = nn.Sequential(
            nn.Conv2d(in_channels, mid, 2, stride=2, bias=False), *_bn_act(mid, True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), *_bn_act(mid, True),
            nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.Dropout2d(dropout),
        )
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = F.pad(F.max_pool2d(x, 2, 2), (0, 0, 0, 0, 0, self.extra_channels))
        return self.act(main + self.ext(x))


def max_unpool2x(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`F.max_unpool2d(x, indices, 2, 2)` written as a scatter: the functional form fails under the jit
    tracing fvcore uses (it checks traced sizes as Python bools)."""
    b, c, h, w = x.shape
    out = x.new_zeros(b, c, 4 * h * w).scatter(2, indices.flatten(2), x.flatten(2))
    return out.view(b, c, 2 * h, 2 * w)


class UpsamplingBottleneck(nn.Module):
    """Main branch: 1x1 conv + BN, max-unpooling with the matching pooling indices; extension: 1x1
    projection, 3x3 stride-2 transposed conv, 1x1 expansion."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.1):
        super().__init__()
        mid = out_channels // 4
        self.main = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.ext = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, bias=False), *_bn_act(mid, False),
            nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1, bias=False), *_bn_act(mid, False),
            nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.Dropout2d(dropout),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        main = max_unpool2x(self.main(x), indices)
        return self.act(main + self.ext(x))


def _stage23(dropout: float = 0.1) -> list[nn.Module]:
    return [Bottleneck(128, "regular", 1, dropout), Bottleneck(128, "dilated", 2, dropout),
            Bottleneck(128, "asymmetric", 1, dropout), Bottleneck(128, "dilated", 4, dropout),
            Bottleneck(128, "regular", 1, dropout), Bottleneck(128, "dilated", 8, dropout),
            Bottleneck(128, "asymmetric", 1, dropout), Bottleneck(128, "dilated", 16, dropout)]


class ENetDecoder(nn.Module):
    """Stages 4-5 and the full conv; unpooling indices recomputed from stages[1] and stages[0]."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.up4 = UpsamplingBottleneck(128, 64)
        self.stage4 = nn.Sequential(Bottleneck(64, prelu=False), Bottleneck(64, prelu=False))
        self.up5 = UpsamplingBottleneck(64, 16)
        self.stage5 = Bottleneck(16, prelu=False)
        self.classifier = nn.ConvTranspose2d(16, num_classes, 3, stride=2, padding=1, output_padding=1, bias=False)

    def forward(self, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        initial, stage1 = stages[0], stages[1]
        _, idx2 = F.max_pool2d(stage1, 2, 2, return_indices=True)  # = stage 2's downsampling pool
        _, idx1 = F.max_pool2d(initial, 2, 2, return_indices=True)  # = stage 1's downsampling pool
        x = self.stage4(self.up4(stages[-1], idx2))
        x = self.stage5(self.up5(x, idx1))
        return {"decoder_feature": x, "logits": self.classifier(x)}


@MODELS.register("enet")
def enet(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    stages = [
        InitialBlock(16),
        nn.Sequential(DownsamplingBottleneck(16, 64, 0.01), *[Bottleneck(64, dropout=0.01) for _ in range(4)]),
        nn.Sequential(DownsamplingBottleneck(64, 128, 0.1), *_stage23()),
        nn.Sequential(*_stage23()),
    ]
    return RealtimeSegNet("enet", num_classes, stages, [16, 64, 128, 128], [2, 4, 8, 8], ENetDecoder, 16,
                          pretrained=pretrained, aux=aux)
