"""Light expert decoder of SDES (Liu et al., AAAI 2023, Table 2 setting).

The paper's Cityscapes experts are "two fully convolutional layers" on the encoder output, "about
0.01 M parameters" and "less than 0.1 G FLOPs" each, and the ensemble teacher for DeepLabV3-ResNet-18
with N = 4 experts has 15.94 M Params / 134.34 G FLOPs (student: 15.90 M / 134.08 G).

Configuration chosen: 1x1 conv in_channels -> 16 (no bias) + BN + ReLU, then 1x1 conv 16 -> classes
(with bias). On ResNet-18's 512-channel last stage with 19 classes that is 8,496 parameters and
0.0696 GFLOPs at 512x1024 (64x128 positions) per expert, so student + 4 experts = 15.94 M /
134.34 G (measured by `sdesbench profile --model ens_t_resnet18`). A 3x3 first layer would need
fewer than 3 hidden channels to stay near 0.01 M; a 3x3 second layer (16 -> 19) gives 0.011 M but
134.42 G. `hidden_channels` and `kernel_size` are exposed for other settings.

Each expert outputs logits over all classes (a subset expert is trained only on its pixels; see the
SDES method), at the resolution of the stage it reads.
"""
from __future__ import annotations

import torch
from torch import nn


class LightExpertDecoder(nn.Module):
    """stages -> {"decoder_feature": B x hidden x h x w, "logits": B x num_classes x h x w} from stages[-1]."""

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 16, kernel_size: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(hidden_channels), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(hidden_channels, num_classes, 1)

    def forward(self, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        feat = self.body(stages[-1])
        return {"decoder_feature": feat, "logits": self.classifier(feat)}
