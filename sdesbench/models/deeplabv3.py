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

Any other timm backbone: `deeplabv3:timm/<name>` (e.g. `deeplabv3:timm/mobilenetv3_large_100`), the
same head on timm's `features_only` levels at strides 4 and deeper (the stride-2 stem level dropped),
dilated to output stride 8. Whether timm can dilate a network is found by building it on the meta
device (no memory, no weights) and reading the stride of its deepest map; a network it cannot dilate
(transformers, DenseNet, VGG, ...) or an unknown name is a one-line error.
"""
from __future__ import annotations

import difflib
import functools
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


def _loose(key: str) -> str:
    """A state-dict key with '_' read as '.': timm's `features_only` wrapper flattens `stages.0` into a
    module `stages_0`, so the full network's keys meet the wrapper's under this reading."""
    return key.replace("_", ".")


def create_timm(timm_name: str, pretrained: bool, weights: str | None, **kwargs) -> nn.Module:
    """A timm model; ImageNet weights from a local file (`weights`: a timm state dict of the full
    classification network; every tensor of the model must be in it, `features_only` renaming
    included, the classifier may be extra), the cache or the hub.

    Without network or cache this fails with one line saying how to provide the weights; it never
    falls back to a random init presented as pretrained.
    """
    if pretrained and weights:
        path = Path(weights)
        state = {_loose(k): v for k, v in read_state(path).items()}
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
        own = {k: t for k, t in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        unfit = [k for k, t in own.items() if _loose(k) not in state or state[_loose(k)].shape != t.shape]
        if unfit:
            raise ConfigError(f"model.weights: {path} does not fit backbone {timm_name} ({len(unfit)} of {len(own)} "
                              f"tensors missing or of another shape, e.g. {unfit[0]})")
        model.load_state_dict({k: state[_loose(k)] for k in own}, strict=False)
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


OUTPUT_STRIDE = 8  # the dilated DeepLabV3 of the paper's tables


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


PROBE_SIZE = 224  # the input size of fixed-size networks, a multiple of 32


def _probe(timm_name: str, run: bool = True, **kwargs) -> tuple[list[int], int]:
    """`timm_name` with `features_only` built (and run) on the meta device, shapes without memory or
    weights: its levels' reductions as timm reports them, and the measured stride of the deepest map."""
    with torch.device("meta"):
        net = timm.create_model(timm_name, pretrained=False, features_only=True, **kwargs).eval()
        stride = PROBE_SIZE // net(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE))[-1].shape[-1] if run else 0
    return list(net.feature_info.reduction()), stride


@functools.lru_cache(maxsize=None)
def dilated_levels(timm_name: str) -> tuple[int, ...]:
    """The `out_indices` of `timm_name`'s feature levels at stride 4 and deeper, checked to reach the
    deepest level at output stride 8; else one line why not (unknown name, no `features_only`, no
    dilation)."""
    where = f"model 'deeplabv3:timm/{timm_name}'"
    if not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (close matches: {', '.join(close)})" if close else " (see timm.list_models())"
        raise ConfigError(f"{where}: timm has no model {timm_name!r}{hint}")
    try:
        reductions, stride = _probe(timm_name, output_stride=OUTPUT_STRIDE)
    except Exception as dilated:  # noqa: BLE001 - timm's own error, told in one line below
        try:
            _probe(timm_name, run=False)
        except Exception as plain:  # noqa: BLE001
            raise ConfigError(f"{where}: timm cannot give its feature maps (features_only: {_first_line(plain)})") from None
        raise ConfigError(f"{where}: timm cannot dilate this backbone to output stride {OUTPUT_STRIDE} "
                          f"({_first_line(dilated)}); choose one that it can, e.g. a ResNet, RegNet, ConvNeXt, "
                          f"EfficientNet or MobileNetV3") from None
    if stride != OUTPUT_STRIDE:  # a network that accepts output_stride and ignores it
        raise ConfigError(f"{where}: timm builds it at output stride {stride}, not {OUTPUT_STRIDE} "
                          f"(no dilation); choose a backbone timm can dilate, e.g. a ResNet or EfficientNet")
    return tuple(i for i, r in enumerate(reductions) if r >= 4)


@MODELS.register_family("deeplabv3", "deeplabv3:timm/<name>")
def deeplabv3_timm(argument: str):
    """The factory of `deeplabv3:timm/<name>`: DeepLabV3 on timm's `<name>` at output stride 8."""
    source, _, timm_name = argument.partition("/")
    if source != "timm" or not timm_name:
        raise ConfigError(f"model 'deeplabv3:{argument}': expected deeplabv3:timm/<timm model name>, "
                          f"e.g. deeplabv3:timm/resnet18")
    out_indices = dilated_levels(timm_name)

    def factory(num_classes: int, pretrained: bool = False, weights: str | None = None, aux: bool = False):
        return DeepLabV3(timm_name, num_classes, out_indices=out_indices, pretrained=pretrained, weights=weights,
                         aux=aux, output_stride=OUTPUT_STRIDE)

    return factory
