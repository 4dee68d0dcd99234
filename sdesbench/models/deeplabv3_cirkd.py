"""DeepLabV3 as CIRKD builds it, for the rows of CIRKD's tables (`deeplabv3_*_cirkd`).

CIRKD (Yang et al., CVPR 2022) trains its students and teacher with its own DeepLabV3, read from
winycg/CIRKD @ 7e0d21fe24ba9f09446e5bcef4797e199177b0fc (the code released with the paper):
`models/deeplabv3.py` (ResNet-18 / ResNet-101), `models/deeplabv3_mobile.py` and
`models/base_models/mobilenetv2.py` (MobileNetV2). It differs from the SDES paper's `deeplabv3_*`
(torchvision's DeepLabHead, whose Params reproduce the SDES paper) in three ways that change the
network (docs/models.md measures each):

- ResNet backbones have the deep stem of `resnet*_v1s` (three 3x3 convs 3->64 (stride 2), 64->64,
  64->128, BN + ReLU after each), as `pspnet_resnet18`; timm's `stem_type="deep", stem_width=64`.
- ASPP (rates 12, 24, 36, image pooling, 1x1 projection + Dropout(0.5)) and the 3x3 conv after it are
  128 channels wide after ResNet-18 and MobileNetV2, 256 after ResNet-101 (256 in torchvision).
  torchvision's `ASPP` is that module layer for layer; CIRKD upsamples the pooled 1x1 map with
  `align_corners=True`, torchvision with False, which for a 1x1 source gives the same constant map.
- After the 3x3 conv + BN + ReLU comes Dropout(0.1) before the classifier; `decoder_feature` is the
  map after that dropout, CIRKD's `x_feat_after_aspp`, which its feature losses read.
- MobileNetV2's head reads the 320-channel last block (dilated to output stride 8); the network's
  1x1 conv 320->1280 is not built (CIRKD comments it out).

The aux head (`model.aux=true`, CIRKD's `_FCNHead` on layer3) is torchvision's FCNHead, as in
`pspnet_resnet18`. CIRKD's MobileNetV2 model has none.

ImageNet weights (`model.pretrained=true`) come from CIRKD's release files, given as
`model.weights=FILE`, or as `model.weights=FOLDER` holding them under CIRKD's names
(`resnet18-imagenet.pth`, `resnet101-imagenet.pth`, `mobilenetv2-imagenet.pth`), so that one
`--set` serves every network of a table, teacher included. timm has no weights for these deep-stem
ResNets. MobileNetV2's file (CSAIL's `mobilenet_v2` layout, `features.N...`) is matched to timm's
backbone tensor by tensor in order, every shape checked; a timm-named file loads by name.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead

from sdesbench.errors import ConfigError
from sdesbench.models.base import MODELS, SegmentationModel
from sdesbench.models.cirkd_weights import cirkd_weights_file, load_cirkd_backbone, load_csail_mobilenetv2
from sdesbench.models.deeplabv3 import create_backbone

ASPP_RATES = (12, 24, 36)
# timm backbone -> (ASPP and head width, the name of CIRKD's ImageNet file); CIRKD models/deeplabv3.py
# (`out_channels = 128` for 512 input channels, 256 for 2048) and deeplabv3_mobile.py (128)
CIRKD_BACKBONES = {"resnet18": (128, "resnet18-imagenet.pth"), "resnet101": (256, "resnet101-imagenet.pth"),
                   "mobilenetv2_100": (128, "mobilenetv2-imagenet.pth")}


class CIRKDDeepLabDecoder(nn.Module):
    """ASPP, 3x3 conv + BN + ReLU + Dropout(0.1) (`decoder_feature`), 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            ASPP(in_channels, list(ASPP_RATES), channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True),
            nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        feat = self.body(stages[-1])
        return {"decoder_feature": feat, "logits": self.classifier(feat)}


class CIRKDDeepLabV3(SegmentationModel):
    """DeepLabV3 on a timm backbone dilated to output stride 8, with CIRKD's stem, head width and feature."""

    def __init__(self, timm_name: str, num_classes: int, pretrained: bool = False, weights: str | None = None,
                 aux: bool = False):
        super().__init__()
        if pretrained and not weights:
            raise ConfigError(f"model.pretrained: the CIRKD-shaped {timm_name} loads CIRKD's ImageNet file; pass "
                              f"--set model.weights=/path/to/{CIRKD_BACKBONES[timm_name][1]} (or a folder of "
                              f"CIRKD's files)")
        self.num_classes = num_classes
        self.pretrained = pretrained
        self.head_width, cirkd_file = CIRKD_BACKBONES[timm_name]
        if timm_name.startswith("resnet"):
            self.backbone = create_backbone(timm_name, (1, 2, 3, 4), False, None, output_stride=8,
                                            stem_type="deep", stem_width=64)
            if pretrained:
                load_cirkd_backbone(self.backbone, cirkd_weights_file(weights, cirkd_file), f"deep-stem {timm_name}",
                                    cirkd_file)
        else:  # MobileNetV2: the blocks ending at strides 4, 8, 16 (dilated), 32 (dilated; 320 channels)
            self.backbone = create_backbone(timm_name, (1, 2, 3, 4), False, None, output_stride=8)
            if pretrained:
                load_csail_mobilenetv2(self.backbone, cirkd_weights_file(weights, cirkd_file))
        info = self.backbone.feature_info
        self.stage_channels = list(info.channels())
        self.stage_strides = [min(r, 8) for r in info.reduction()]
        self.decoder = self.build_decoder(num_classes)
        self.decoder_channels = self.head_width
        self.aux_head = FCNHead(self.stage_channels[-2], num_classes) if aux else None

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(x))

    def build_decoder(self, num_classes: int) -> nn.Module:
        return CIRKDDeepLabDecoder(self.stage_channels[-1], num_classes, self.head_width)


@MODELS.register("deeplabv3_resnet18_cirkd")
def deeplabv3_resnet18_cirkd(num_classes: int, pretrained: bool = False, weights: str | None = None,
                             aux: bool = False):
    """CIRKD's DeepLabV3-ResNet18 student (deep stem, 128-wide ASPP)."""
    return CIRKDDeepLabV3("resnet18", num_classes, pretrained, weights, aux)


@MODELS.register("deeplabv3_resnet101_cirkd")
def deeplabv3_resnet101_cirkd(num_classes: int, pretrained: bool = False, weights: str | None = None,
                              aux: bool = False):
    """CIRKD's DeepLabV3-ResNet101 teacher (deep stem, 256-wide ASPP)."""
    return CIRKDDeepLabV3("resnet101", num_classes, pretrained, weights, aux)


@MODELS.register("deeplabv3_mobilenetv2_cirkd")
def deeplabv3_mobilenetv2_cirkd(num_classes: int, pretrained: bool = False, weights: str | None = None,
                                aux: bool = False):
    """CIRKD's DeepLabV3-MobileNetV2 student (head on the 320-channel block, 128-wide ASPP; no aux head)."""
    if aux:
        raise ConfigError("model.aux: CIRKD's DeepLabV3-MobileNetV2 has no auxiliary head (models/deeplabv3_mobile.py)")
    return CIRKDDeepLabV3("mobilenetv2_100", num_classes, pretrained, weights, aux)
