"""DeepLabV3 (Chen et al. 2017) on dilated timm backbones at output stride 8.

The head is torchvision's DeepLabHead (ASPP with rates 12/24/36 and 256 channels, a 3x3 conv,
then the 1x1 classifier). `decoder_feature` is the 256-channel map before the classifier.
`stages` are the backbone's feature levels after the stem (ResNet: layer1..layer4; MobileNetV2 and
EfficientNet-B0: the blocks ending at strides 4, 8, 16, 32 before dilation).

Configurations that reproduce the paper's Params (see docs/models.md for the measured table):

- ResNet-18/50/101: timm `features_only`, layer1..layer4, head on layer4 (512 / 2048 channels).
- MobileNetV2 (12.65 M, 11 classes): the network's last 1x1 conv 320->1280 (timm `conv_head` + `bn2`,
  which `features_only` drops) is applied to the last block and feeds the head with 1280 channels, as
  in encoders built from the full classification network minus its classifier.
- EfficientNet-B0 (7.31 M, 11 classes): the head reads the 320-channel last block; the network's last
  1x1 conv 320->1280 is *kept but unused* (`unused_conv_head`, frozen). The paper's figure is only met
  with it counted (6.90 M without it, 14.43 M if it fed the head): the widely used EfficientNet encoder
  of segmentation-models-pytorch deletes only the classifier and keeps that conv without calling it.
  It adds parameters, never FLOPs or gradients.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from sdesbench.errors import ConfigError
from sdesbench.models.base import MODELS, SegmentationModel


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


# model -> its timm backbone, whose ImageNet weights `model.pretrained` loads
BACKBONES = {"deeplabv3_resnet18": "resnet18", "deeplabv3_resnet50": "resnet50", "deeplabv3_resnet101": "resnet101",
             "deeplabv3_mobilenetv2": "mobilenetv2_100", "deeplabv3_efficientnet_b0": "efficientnet_b0"}


def cached_weights(timm_name: str) -> str | None:
    """The file timm would load `timm_name`'s ImageNet weights from without network (the Hugging Face
    hub cache, or torch hub's checkpoint folder for weights timm downloads by URL), or None."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(hit, str):
                return hit
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if path.is_file():
            return str(path)
    return None


def read_state(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file (a checkpoint's `state_dict` unwrapped), or one line why not."""
    if not file.is_file():
        raise ConfigError(f"model.weights: no such file {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # not a tensor file: one line, not a traceback
        raise ConfigError(f"model.weights: cannot read {file} as a state dict ({type(e).__name__})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def create_timm(timm_name: str, pretrained: bool, weights: str | None, **kwargs) -> nn.Module:
    """A timm model; ImageNet weights from a local file (`weights`), the cache or the hub.

    Without network or cache this fails with one line saying how to provide the weights; it never
    falls back to a random init presented as pretrained.
    """
    if pretrained and weights:
        path = Path(weights)
        state = read_state(path)
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        missing, _ = model.load_state_dict(state, strict=False)
        if len(missing) > len(model.state_dict()) // 2:
            raise ConfigError(f"model.weights: {path} does not fit backbone {timm_name} ({len(missing)} tensors missing)")
        return model
    try:
        return timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except Exception as e:  # no network / no cache: never fall back to random weights silently
        if not pretrained:
            raise
        raise ConfigError(
            f"could not load ImageNet weights for {timm_name} ({type(e).__name__}); without network, download them "
            f"elsewhere and pass --set model.weights=/path/to/{timm_name}.pth (or put them in the timm/HF cache)"
        ) from None


def create_backbone(timm_name: str, out_indices: tuple[int, ...], pretrained: bool, weights: str | None,
                    **kwargs) -> nn.Module:
    """timm backbone with `features_only` (see `create_timm` for the weights)."""
    return create_timm(timm_name, pretrained, weights, features_only=True, out_indices=out_indices, **kwargs)


def create_conv_head(timm_name: str, pretrained: bool, weights: str | None) -> nn.Module:
    """The last 1x1 conv + BN + activation of a timm MobileNet/EfficientNet (dropped by `features_only`),
    with the same weights source as the backbone."""
    full = create_timm(timm_name, pretrained, weights, num_classes=0)
    return nn.Sequential(full.conv_head, full.bn2)


class DeepLabV3(SegmentationModel):
    """DeepLabV3 on a timm backbone.

    `conv_head`: what to do with the network's last 1x1 conv that `features_only` drops (MobileNet /
    EfficientNet only): "none" (absent), "feed" (applied to the last stage; its output is the last
    entry of `stages` and feeds the head), "unused" (kept, frozen and never called, so it is counted in
    Params as in the paper's EfficientNet-B0 but changes nothing else).
    """

    def __init__(self, timm_name: str, num_classes: int, out_indices: tuple[int, ...] = (1, 2, 3, 4),
                 pretrained: bool = False, weights: str | None = None, aux: bool = False, output_stride: int = 8,
                 conv_head: str = "none", **backbone_kwargs):
        super().__init__()
        if conv_head not in ("none", "feed", "unused"):
            raise ValueError(f"conv_head must be none|feed|unused, got {conv_head!r}")
        self.num_classes = num_classes
        self.pretrained = pretrained
        self.backbone = create_backbone(timm_name, out_indices, pretrained, weights, output_stride=output_stride,
                                        **backbone_kwargs)
        info = self.backbone.feature_info
        self.stage_channels = list(info.channels())
        self.stage_strides = [min(r, output_stride) for r in info.reduction()]
        self.conv_head = None
        self.unused_conv_head = None
        if conv_head == "feed":
            self.conv_head = create_conv_head(timm_name, pretrained, weights)
            self.stage_channels[-1] = self.conv_head[0].out_channels
        elif conv_head == "unused":
            self.unused_conv_head = create_conv_head(timm_name, pretrained, weights).requires_grad_(False)
        self.decoder_channels = 256
        self.decoder = DeepLabDecoder(self.stage_channels[-1], num_classes)
        self.aux_head = FCNHead(self.stage_channels[-2], num_classes) if aux else None

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        stages = list(self.backbone(x))
        if self.conv_head is not None:
            stages[-1] = self.conv_head(stages[-1])
        return stages

    def build_decoder(self, num_classes: int) -> nn.Module:
        return DeepLabDecoder(self.stage_channels[-1], num_classes)


@MODELS.register("deeplabv3_resnet18")
def deeplabv3_resnet18(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    return DeepLabV3(BACKBONES["deeplabv3_resnet18"], num_classes, pretrained=pretrained, weights=weights, aux=aux)


@MODELS.register("deeplabv3_resnet50")
def deeplabv3_resnet50(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    return DeepLabV3(BACKBONES["deeplabv3_resnet50"], num_classes, pretrained=pretrained, weights=weights, aux=aux)


@MODELS.register("deeplabv3_resnet101")
def deeplabv3_resnet101(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    """Optional stronger teacher (not in the paper's tables)."""
    return DeepLabV3(BACKBONES["deeplabv3_resnet101"], num_classes, pretrained=pretrained, weights=weights, aux=aux)


@MODELS.register("deeplabv3_mobilenetv2")
def deeplabv3_mobilenetv2(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    return DeepLabV3(BACKBONES["deeplabv3_mobilenetv2"], num_classes, pretrained=pretrained, weights=weights, aux=aux,
                     conv_head="feed")


@MODELS.register("deeplabv3_efficientnet_b0")
def deeplabv3_efficientnet_b0(num_classes: int, pretrained: bool = False, weights: str | None = None,
                              aux: bool = False):
    return DeepLabV3(BACKBONES["deeplabv3_efficientnet_b0"], num_classes, pretrained=pretrained, weights=weights,
                     aux=aux, conv_head="unused")
