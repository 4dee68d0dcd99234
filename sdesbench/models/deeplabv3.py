"""DeepLabV3 (Chen et al. 2017) on dilated timm backbones at output stride 8.

The head is torchvision's DeepLabHead (ASPP with rates 12/24/36 and 256 channels, a 3x3 conv,
then the 1x1 classifier). `decoder_feature` is the 256-channel map before the classifier.
`stages` are the backbone's feature levels after the stem (ResNet: layer1..layer4).
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from sdesbench.errors import ConfigError
from sdesbench.models.base import SegmentationModel
from sdesbench.registry import MODELS


class DeepLabDecoder(nn.Module):
    """DeepLabHead split so the pre-classifier feature can be returned."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        head = DeepLabHead(in_channels, num_classes)
        layers = list(head.children())
        self.body = nn.Sequential(*layers[:-1])
        self.classifier = layers[-1]

    def forward(self, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        feat = self.body(stages[-1])
        return {"decoder_feature": feat, "logits": self.classifier(feat)}


def create_backbone(timm_name: str, out_indices: tuple[int, ...], pretrained: bool, weights: str | None,
                    **kwargs) -> nn.Module:
    """timm backbone with `features_only`; ImageNet weights from a local file, the cache or the hub."""
    if pretrained and weights:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"model.weights: no such file {path}")
        backbone = timm.create_model(timm_name, features_only=True, out_indices=out_indices, pretrained=False, **kwargs)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, _ = backbone.load_state_dict(state, strict=False)
        if len(missing) > len(backbone.state_dict()) // 2:
            raise ConfigError(f"model.weights: {path} does not fit backbone {timm_name} ({len(missing)} tensors missing)")
        return backbone
    try:
        return timm.create_model(timm_name, features_only=True, out_indices=out_indices, pretrained=pretrained, **kwargs)
    except Exception as e:  # no network / no cache: never fall back to random weights silently
        if not pretrained:
            raise
        raise ConfigError(
            f"could not load ImageNet weights for {timm_name} ({type(e).__name__}); without network, download them "
            f"elsewhere and pass --set model.weights=/path/to/{timm_name}.pth (or put them in the timm/HF cache)"
        ) from None


class DeepLabV3(SegmentationModel):
    def __init__(self, timm_name: str, num_classes: int, out_indices: tuple[int, ...] = (1, 2, 3, 4),
                 pretrained: bool = False, weights: str | None = None, aux: bool = False, output_stride: int = 8,
                 **backbone_kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.pretrained = pretrained
        self.backbone = create_backbone(timm_name, out_indices, pretrained, weights, output_stride=output_stride,
                                        **backbone_kwargs)
        info = self.backbone.feature_info
        self.stage_channels = list(info.channels())
        self.stage_strides = [min(r, output_stride) for r in info.reduction()]
        self.decoder_channels = 256
        self.decoder = DeepLabDecoder(self.stage_channels[-1], num_classes)
        self.aux_head = FCNHead(self.stage_channels[-2], num_classes) if aux else None

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(x))

    def build_decoder(self, num_classes: int) -> nn.Module:
        return DeepLabDecoder(self.stage_channels[-1], num_classes)


@MODELS.register("deeplabv3_resnet18")
def deeplabv3_resnet18(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    return DeepLabV3("resnet18", num_classes, pretrained=pretrained, weights=weights, aux=aux)


@MODELS.register("deeplabv3_resnet50")
def deeplabv3_resnet50(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    return DeepLabV3("resnet50", num_classes, pretrained=pretrained, weights=weights, aux=aux)
