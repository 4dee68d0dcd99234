"""CIRKD's ImageNet backbone files (winycg/CIRKD README: resnet18-imagenet.pth, resnet101-imagenet.pth,
mobilenetv2-imagenet.pth) loaded into timm backbones, for `pspnet_resnet18` and `deeplabv3_*_cirkd`.

`model.weights` names such a file, or a folder holding them under CIRKD's names, so that one `--set`
serves every network of a CIRKD table, its teacher included.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from sdesbench.errors import ConfigError
from sdesbench.models.deeplabv3 import read_state

# CIRKD's deep-stem state-dict names (resnetv1b.py: conv1/bn1/conv2/bn2/conv3/bn3) -> timm's deep stem
# (`conv1` = Sequential(conv, bn, relu, conv, bn, relu, conv), then `bn1` after the last conv)
CIRKD_STEM_KEYS = {"conv1.": "conv1.0.", "bn1.": "conv1.1.", "conv2.": "conv1.3.", "bn2.": "conv1.4.",
                   "conv3.": "conv1.6.", "bn3.": "bn1."}


# CSAIL's MobileNetV2: blocks features.0-17 (stem to the 320-channel block); 18 is the 1x1 conv CIRKD leaves out
CSAIL_LAST_BLOCK = 17


def cirkd_weights_file(weights: str, filename: str) -> str:
    """`model.weights` as a file: itself, or CIRKD's `filename` inside a folder."""
    path = Path(weights)
    if path.is_dir():
        path = path / filename
        if not path.is_file():
            raise ConfigError(f"model.weights: the folder {path.parent} has no {filename} (CIRKD's ImageNet file "
                              f"of this network)")
    return str(path)


def cirkd_to_timm_key(key: str) -> str:
    """A key of CIRKD's deep-stem ResNet state dict as timm names it (stem keys renamed, others kept)."""
    for cirkd, timm_prefix in CIRKD_STEM_KEYS.items():
        if key.startswith(cirkd):
            return timm_prefix + key[len(cirkd):]
    return key


def load_cirkd_backbone(backbone: nn.Module, path: str, network: str = "deep-stem ResNet-18 of pspnet_resnet18",
                        expected: str = "resnet18-imagenet.pth") -> None:
    """ImageNet weights for a deep-stem ResNet backbone from a local file: CIRKD's `resnet*-imagenet.pth`
    (stem keys renamed, `fc.*` ignored) or a timm-named state dict of the same network. Every backbone
    tensor must be found with its shape, else one line says how many were not."""
    file = Path(path)
    state = read_state(file)
    if "conv1.0.weight" not in state:  # CIRKD's names; a timm-named file is taken as it is
        state = {cirkd_to_timm_key(k): v for k, v in state.items()}
    own = backbone.state_dict()
    found = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if len(found) < len(own):
        raise ConfigError(f"model.weights: {file} does not fit the {network} "
                          f"({len(own) - len(found)} of {len(own)} tensors missing or of another shape; "
                          f"expected CIRKD's {expected})")
    backbone.load_state_dict(found)


def load_csail_mobilenetv2(backbone: nn.Module, path: str) -> None:
    """CIRKD's mobilenetv2-imagenet.pth (CSAIL's names: `features.0` .. `features.17`, then the 1x1 conv
    `features.18` and the classifier, which the backbone lacks) into timm's MobileNetV2 backbone: the two
    hold the same tensors in the same order with the same shapes, so they are matched one to one in
    order, BatchNorm step counters left out. A timm-named file loads by name."""
    file = Path(path)
    state = read_state(file)
    own = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    if not set(own) <= set(state):  # not timm's names: CSAIL's, in order
        theirs = [(k, v) for k, v in state.items() if k.startswith("features.")
                  and int(k.split(".")[1]) <= CSAIL_LAST_BLOCK and not k.endswith("num_batches_tracked")]
        fits = len(theirs) == len(own) and all(tuple(v.shape) == tuple(o.shape)
                                               for (_, v), o in zip(theirs, own.values()))
        if not fits:
            raise ConfigError(f"model.weights: {file} does not fit the MobileNetV2 backbone ({len(theirs)} tensors "
                              f"under features.0-{CSAIL_LAST_BLOCK} for {len(own)}, or of other shapes; expected CIRKD's "
                              f"mobilenetv2-imagenet.pth or timm's mobilenetv2_100)")
        state = {name: v for name, (_, v) in zip(own, theirs)}
    backbone.load_state_dict({k: state[k] for k in own}, strict=False)
