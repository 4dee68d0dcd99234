"""mmsegmentation's dilated-ResNet networks (`pspnet_r101_d8`, `deeplabv3_r18_d8`), for MGD's own group of the
`frontier` table: MGD (yzd-v/MGD @ 2c9da0b, `seg/`) distils mmseg's PSPNet-R101-D8 into mmseg's DeepLabV3-R18-D8
(its configs `configs/distillers/mgd/psp_r101_distill_deepv3_r18_40k_512x512_city.py`, the student
`configs/deeplabv3/deeplabv3_r18-d8_512x512_40k_cityscapes.py`, the teacher mmseg's
`configs/pspnet/pspnet_r101-d8_512x1024_40k_cityscapes.py`; mmseg 0.20.2, the version MGD's README names).
They are not CIRKD's networks of the same names (`pspnet_resnet18`, `deeplabv3_*_cirkd`):

- Backbone `ResNetV1c` (mmseg `backbones/resnet.py`): a deep stem of three 3x3 convs 3->32 (stride 2), 32->32,
  32->64 (CIRKD's: 64, 64, 128), each with BN + ReLU, then the max-pool; strides (1, 2, 1, 1) and dilations
  (1, 1, 2, 4) with `contract_dilation` (each dilated layer's first block at half the dilation): timm's ResNet
  with `stem_type="deep", stem_width=32` at output stride 8, tensor for tensor. One difference remains in
  ResNet-18's BasicBlock: mmseg dilates only its first 3x3 conv (the second has padding 1, no dilation), timm
  both; the second conv of every dilated BasicBlock is set back to dilation 1 here (`undilate_second_convs`).
- PSPHead (`decode_heads/psp_head.py`, channels 512): pyramid pooling with bins 1, 2, 3, 6 (1x1 conv
  2048->512 + BN + ReLU per bin, upsampled with `align_corners=False`), concatenation (4096 channels), 3x3
  conv -> 512 + BN + ReLU (`bottleneck`), Dropout(0.1), 1x1 classifier: `pspnet.PSPDecoder` with mmseg's
  upsampling.
- ASPPHead (`decode_heads/aspp_head.py`, channels 128 after ResNet-18): the image-pooling branch (1x1 conv +
  BN + ReLU, bilinear back to the map) *first*, then a 1x1 branch and 3x3 branches at dilations 12, 24, 36,
  concatenated (5 x 128) and fused by a 3x3 conv + BN + ReLU (`bottleneck`); Dropout(0.1), 1x1 classifier.
  torchvision's ASPP (CIRKD's) orders the pooling branch last, fuses with a 1x1 conv + Dropout(0.5) and adds a
  3x3 conv after it: another network.
- Aux head FCNHead (`num_convs=1, concat_input=False`) on layer3: 3x3 conv in -> in/4 + BN + ReLU,
  Dropout(0.1), 1x1 classifier, weight 0.4: torchvision's FCNHead layer for layer.

`decoder_feature` is the `bottleneck` output after the dropout (the map the classifier reads, as for every model
here). Parameters with 19 classes and the aux head, counted on mmseg 0.20.2's own modules (tests/test_mmseg_models.py):
pspnet_r101_d8 67,967,622, deeplabv3_r18_d8 13,986,374.

Weights (`model.weights`, read by their key layout, `load_mmseg_weights`): open-mmlab's ImageNet ResNetV1c files
(`resnet18_v1c-b5776b93.pth`, `resnet101_v1c-e67eebb6.pth`, MMCV's `open-mmlab://resnet*_v1c`; keys `stem.*`,
`layer*`, `fc.*` ignored) into the backbone, or an mmseg segmentor checkpoint (`backbone.*`, `decode_head.*`,
`auxiliary_head.*`; e.g. mmseg's released `pspnet_r101-d8_512x1024_40k_cityscapes_20200604_232751-467e7cf4.pth`,
MGD's teacher; an MGD distillation checkpoint's `student.` prefix is stripped) into the whole network, the
classifiers only when the class counts agree. A folder holding the ImageNet files as `resnet18_v1c.pth` /
`resnet101_v1c.pth` serves a whole table, as CIRKD's folder does.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.fcn import FCNHead

from sdesbench.errors import ConfigError
from sdesbench.models.base import MODELS, SegmentationModel
from sdesbench.models.cirkd_weights import cirkd_weights_file
from sdesbench.models.deeplabv3 import create_backbone, read_state
from sdesbench.models.pspnet import PSPDecoder

MMSEG_ASPP_DILATIONS = (1, 12, 24, 36)  # configs/_base_/models/deeplabv3_r50-d8.py

# mmseg's key -> ours, in order (the first matching rule renames a key)
MMSEG_BACKBONE_RULES = [(r"^backbone\.stem\.0\.", "backbone.conv1.0."), (r"^backbone\.stem\.1\.", "backbone.conv1.1."),
                        (r"^backbone\.stem\.3\.", "backbone.conv1.3."), (r"^backbone\.stem\.4\.", "backbone.conv1.4."),
                        (r"^backbone\.stem\.6\.", "backbone.conv1.6."), (r"^backbone\.stem\.7\.", "backbone.bn1.")]
MMSEG_AUX_RULES = [(r"^auxiliary_head\.convs\.0\.conv\.", "aux_head.0."),
                   (r"^auxiliary_head\.convs\.0\.bn\.", "aux_head.1."), (r"^auxiliary_head\.conv_seg\.", "aux_head.4.")]
MMSEG_HEAD_RULES = {
    "psp": [(r"^decode_head\.psp_modules\.(\d+)\.1\.conv\.", r"decoder.ppm.branches.\1.1."),
            (r"^decode_head\.psp_modules\.(\d+)\.1\.bn\.", r"decoder.ppm.branches.\1.2.")],
    "aspp": [(r"^decode_head\.(image_pool\.1|aspp_modules\.\d+)\.conv\.", r"decoder.\1.0."),
             (r"^decode_head\.(image_pool\.1|aspp_modules\.\d+)\.bn\.", r"decoder.\1.1.")],
}
MMSEG_COMMON_HEAD_RULES = [(r"^decode_head\.bottleneck\.conv\.", "decoder.body.0."),
                           (r"^decode_head\.bottleneck\.bn\.", "decoder.body.1."),
                           (r"^decode_head\.conv_seg\.", "decoder.classifier.")]
CLASSIFIERS = ("decoder.classifier.", "aux_head.4.")


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    """mmcv's ConvModule as mmseg's heads build it: conv without bias, BN, ReLU."""
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class MMSegASPPDecoder(nn.Module):
    """mmseg's ASPPHead: [image pool, 1x1, 3x3 at 12/24/36] -> 3x3 bottleneck -> Dropout(0.1) (`decoder_feature`)
    -> 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int, dilations=MMSEG_ASPP_DILATIONS):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels))
        self.aspp_modules = nn.ModuleList(conv_bn_relu(in_channels, channels, 1 if d == 1 else 3, d) for d in dilations)
        self.body = nn.Sequential(*conv_bn_relu((len(dilations) + 1) * channels, channels, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, stages: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = stages[-1]
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        feat = self.body(torch.cat([pooled, *(branch(x) for branch in self.aspp_modules)], dim=1))
        return {"decoder_feature": feat, "logits": self.classifier(feat)}


def undilate_second_convs(backbone: nn.Module) -> None:
    """mmseg's BasicBlock dilates conv1 only (conv2: 3x3, padding 1); timm's dilates both."""
    for module in backbone.modules():
        conv2 = getattr(module, "conv2", None)
        if hasattr(module, "conv1") and not hasattr(module, "conv3") and isinstance(conv2, nn.Conv2d):
            conv2.dilation, conv2.padding = (1, 1), (1, 1)


class MMSegResNetD8(SegmentationModel):
    """mmseg's ResNetV1c-D8 (output stride 8) with a PSPHead or an ASPPHead and the FCN aux head on layer3."""

    def __init__(self, depth: int, head: str, channels: int, num_classes: int, pretrained: bool = False,
                 weights: str | None = None, aux: bool = False):
        super().__init__()
        self.timm_name, self.head, self.head_width = f"resnet{depth}", head, channels
        self.imagenet_file = f"resnet{depth}_v1c.pth"
        if pretrained and not weights:
            raise ConfigError(f"model.pretrained: timm has no weights for mmseg's ResNetV1c-{depth}; pass --set "
                              f"model.weights=/path/to/resnet{depth}_v1c-*.pth (open-mmlab://resnet{depth}_v1c), an "
                              f"mmseg checkpoint of this network, or a folder holding {self.imagenet_file}")
        self.num_classes = num_classes
        self.pretrained = pretrained
        self.backbone = create_backbone(self.timm_name, (1, 2, 3, 4), False, None, output_stride=8,
                                        stem_type="deep", stem_width=32)
        undilate_second_convs(self.backbone)
        info = self.backbone.feature_info
        self.stage_channels = list(info.channels())
        self.stage_strides = [min(r, 8) for r in info.reduction()]
        self.decoder = self.build_decoder(num_classes)
        self.decoder_channels = channels
        self.aux_head = FCNHead(self.stage_channels[-2], num_classes) if aux else None
        if pretrained:
            load_mmseg_weights(self, weights)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(x))

    def build_decoder(self, num_classes: int) -> nn.Module:
        if self.head == "psp":
            return PSPDecoder(self.stage_channels[-1], num_classes, channels=self.head_width, align_corners=False)
        return MMSegASPPDecoder(self.stage_channels[-1], num_classes, self.head_width)


def mmseg_to_ours(state: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """An mmseg segmentor state dict (`backbone.`, `decode_head.`, `auxiliary_head.`) under our module names."""
    rules = [*MMSEG_BACKBONE_RULES, *MMSEG_HEAD_RULES[head], *MMSEG_COMMON_HEAD_RULES, *MMSEG_AUX_RULES]
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            new, n = re.subn(pattern, replacement, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def load_mmseg_weights(model: MMSegResNetD8, weights: str) -> None:
    """`weights` (a file, or a folder holding the ImageNet file) into `model`, by its key layout (module
    docstring): the whole network from an mmseg checkpoint, else the backbone from an ImageNet ResNetV1c file.
    Every backbone tensor (and head tensor, for a checkpoint) must be found with its shape, else one line."""
    file = Path(cirkd_weights_file(weights, model.imagenet_file))
    state = read_state(file)
    state = {k[len("student."):] if k.startswith("student.") else k: v for k, v in state.items()}
    whole = any(k.startswith("decode_head.") for k in state)
    if not whole and not any(k.startswith("backbone.") for k in state):  # an ImageNet file: the backbone's names
        state = {f"backbone.{k}": v for k, v in state.items()}
    state = mmseg_to_ours(state, model.head)
    own = model.state_dict()
    if not whole:
        own = {k: v for k, v in own.items() if k.startswith("backbone.")}
    found = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    # another class count: the classifiers stay initialised, as when fine-tuning on another dataset
    missing = [k for k in own if k not in found and not k.startswith(CLASSIFIERS)]
    if missing:
        kind = "mmseg checkpoint" if whole else "ImageNet ResNetV1c file"
        raise ConfigError(f"model.weights: {file} does not fit {model.timm_name}-D8 with the {model.head} head as an "
                          f"{kind} ({len(missing)} of {len(own)} tensors missing or of another shape, e.g. "
                          f"{missing[0]})")
    model.load_state_dict(found, strict=False)


@MODELS.register("pspnet_r101_d8")
def pspnet_r101_d8(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    """mmseg's PSPNet-R101-D8 (ResNetV1c-101, PSPHead 512 wide): MGD's teacher."""
    return MMSegResNetD8(101, "psp", 512, num_classes, pretrained, weights, aux)


@MODELS.register("deeplabv3_r18_d8")
def deeplabv3_r18_d8(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
    """mmseg's DeepLabV3-R18-D8 (ResNetV1c-18, ASPPHead 128 wide): MGD's DeepLabV3 student."""
    return MMSegResNetD8(18, "aspp", 128, num_classes, pretrained, weights, aux)
