"""PSPNet (Zhao et al., CVPR 2017) on a dilated ResNet-18 at output stride 8, as CIRKD builds its student.

CIRKD (Yang et al., CVPR 2022; winycg/CIRKD, commit 7e0d21f, the code released with the paper) trains
a PSPNet-ResNet18 student. What it builds, read from `models/pspnet.py`, `models/segbase.py` and
`models/base_models/resnetv1b.py` of that commit (this network is unchanged up to the current commit
dab64db: the same outputs on the same weights):

- Backbone `resnet18_v1s`: ResNet-18 with a *deep stem* (three 3x3 convs 3->64 (stride 2), 64->64,
  64->128, each with BN + ReLU, then the 3x3 max-pool; layer1 therefore starts from 128 channels and
  gets a 1x1 projection), layer3 / layer4 dilated 2 / 4 instead of strided (output stride 8; the first
  block of layer4 has dilation 2 in its first conv). timm's `resnet18` with `stem_type="deep",
  stem_width=64` and `output_stride=8` is that network tensor for tensor (same shapes, dilations and
  11,324,992 parameters). CIRKD's ImageNet checkpoint `resnet18-imagenet.pth` (by its name and the
  layout CIRKD's loader requires, the deep-stem ResNet-18 that CSAILVision's semantic-segmentation-
  pytorch publishes at sceneparsing.csail.mit.edu; CIRKD's `mobilenetv2.py` points at that project's
  pretrained folder) loads into it with the stem keys renamed (`models/cirkd_weights.py`; `model.weights` may also be a
  folder of CIRKD's files). `pspnet_resnet18_vanilla` is the same model with the standard 7x7 stem (CIRKD's
  `resnet18_vanilla`, timm's plain `resnet18`, whose ImageNet weights timm provides).
- Head `_PSPHead` on layer4 (512 channels): pyramid pooling with bins 1, 2, 3, 6, each branch
  adaptive average pooling -> 1x1 conv 512->128 (no bias) -> BN -> ReLU -> bilinear upsampling to
  the feature size with `align_corners=True`; concatenation [layer4, bin 1, bin 2, bin 3, bin 6]
  (1024 channels); 3x3 conv 1024->128 (no bias) -> BN -> ReLU -> Dropout(0.1); 1x1 classifier 128->C
  with bias. `decoder_feature` is the 128-channel map after that dropout, the `features` CIRKD's
  losses read.
- Aux head (`model.aux=true`): CIRKD's `_FCNHead` on layer3 (256 -> 64 3x3 conv, BN, ReLU,
  Dropout(0.1), 1x1 to C), which is torchvision's FCNHead layer for layer. CIRKD turns it on for
  every ResNet student (`train_baseline.py` / `train_kd.py` set `args.aux = True` when the backbone
  name starts with "resnet") and weights its cross-entropy by 0.4 (`--aux-weight 0.4`;
  `train_kd.py`: `task_loss = CE(out) + 0.4 * CE(aux)`), which is the default `aux_weight` of the
  `student` and teacher-student methods here.

Params and FLOPs against CIRKD's Table 1 figures: docs/models.md (`sdesbench profile --reference cirkd`).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.fcn import FCNHead

from sdesbench.errors import ConfigError
from sdesbench.models.base import MODELS, SegmentationModel
from sdesbench.models.cirkd_weights import cirkd_weights_file, load_cirkd_backbone
from sdesbench.models.deeplabv3 import create_backbone

PSP_BINS = (1, 2, 3, 6)
Stem = Literal["deep", "standard"]


class PyramidPooling(nn.Module):
    """The pyramid pooling module: the input concatenated with one pooled, reduced and upsampled map
    per bin (B x (C + len(bins) * C/reduction) x h x w)."""

    def __init__(self, in_channels: int, bins: tuple[int, ...] = PSP_BINS, reduction: int = 4,
                 align_corners: bool = True):
        super().__init__()
        branch_channels = in_channels // reduction
        self.bins = tuple(bins)
        self.align_corners = align_corners
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, branch_channels, 1, bias=False),
                          nn.BatchNorm2d(branch_channels), nn.ReLU(inplace=True))
            for b in self.bins)
        self.out_channels = in_channels + len(self.bins) * branch_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        # align_corners=True as CIRKD's _PyramidPooling (and the original PSPNet's interp layer); mmseg's
        # PSPHead upsamples with False (`pspnet_r101_d8`)
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=self.align_corners)
                  for branch in self.branches]
        return torch.cat([x, *pooled], dim=1)


class PSPDecoder(nn.Module):
    """Pyramid pooling, 3x3 conv + BN + ReLU + dropout (`decoder_feature`), 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 128, dropout: float = 0.1,
                 align_corners: bool = True):
        super().__init__()
        self.ppm = PyramidPooling(in_channels, align_corners=align_corners)
        self.body = nn.Sequential(
            nn.Conv2d(self.ppm.out_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        feat = self.body(self.ppm(stages[-1]))
        return {"decoder_feature": feat, "logits": self.classifier(feat)}


class PSPNet(SegmentationModel):
    """PSPNet on a timm ResNet dilated to output stride 8; the head reads the last stage.

    `stem`: "deep" (CIRKD's resnet18_v1s: three 3x3 convs to 128 channels) or "standard" (the 7x7
    conv of torchvision/timm `resnet18`).
    """

    def __init__(self, num_classes: int, timm_name: str = "resnet18", stem: Stem = "deep",
                 pretrained: bool = False, weights: str | None = None, aux: bool = False, output_stride: int = 8):
        super().__init__()
        if stem not in ("deep", "standard"):
            raise ValueError(f"stem must be deep|standard, got {stem!r}")
        self.num_classes = num_classes
        self.pretrained = pretrained
        out_indices = (1, 2, 3, 4)
        if stem == "deep":
            if pretrained and not weights:
                raise ConfigError("model.pretrained: timm has no ImageNet weights for the deep-stem ResNet-18 of "
                                  "pspnet_resnet18; pass --set model.weights=/path/resnet18-imagenet.pth (CIRKD's "
                                  "release), or use pspnet_resnet18_vanilla (7x7 stem, timm's weights)")
            self.backbone = create_backbone(timm_name, out_indices, False, None, output_stride=output_stride,
                                            stem_type="deep", stem_width=64)
            if pretrained:
                load_cirkd_backbone(self.backbone, cirkd_weights_file(weights, "resnet18-imagenet.pth"))
        else:
            self.backbone = create_backbone(timm_name, out_indices, pretrained, weights, output_stride=output_stride)
        info = self.backbone.feature_info
        self.stage_channels = list(info.channels())
        self.stage_strides = [min(r, output_stride) for r in info.reduction()]
        self.decoder = self.build_decoder(num_classes)
        self.decoder_channels = self.decoder.classifier.in_channels
        self.aux_head = FCNHead(self.stage_channels[-2], num_classes) if aux else None

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(x))

    def build_decoder(self, num_classes: int) -> nn.Module:
        # CIRKD's width after ResNet-18's 512 channels: 128 (its R50/R101 PSPNet would use 256)
        return PSPDecoder(self.stage_channels[-1], num_classes, channels=128)


@MODELS.register("pspnet_resnet18")
def pspnet_resnet18(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    """CIRKD's PSPNet-ResNet18 student (deep stem)."""
    return PSPNet(num_classes, stem="deep", pretrained=pretrained, weights=weights, aux=aux)


@MODELS.register("pspnet_resnet18_vanilla")
def pspnet_resnet18_vanilla(num_classes: int, pretrained: bool = False, weights: str | None = None,
                            aux: bool = False):
    """The same with the standard 7x7 stem (CIRKD's `resnet18_vanilla`; timm's ImageNet weights)."""
    return PSPNet(num_classes, stem="standard", pretrained=pretrained, weights=weights, aux=aux)
