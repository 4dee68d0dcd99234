"""mmseg's PSPNet-R101-D8 and DeepLabV3-R18-D8 (sdesbench/models/mmseg.py), the networks of MGD's own group of
the frontier table, against mmsegmentation 0.20.2's modules.

tests/fixtures/mmseg_d8.json was recorded with mmsegmentation 0.20.2 / mmcv 1.4.2 (the versions yzd-v/MGD @
2c9da0b `seg/README.md` names), building each network with `build_segmentor` from mmseg's configs
(`configs/_base_/models/pspnet_r50-d8.py` at depth 101, MGD's teacher; `deeplabv3_r50-d8.py` at depth 18 with
MGD's `configs/deeplabv3/deeplabv3_r18-d8_512x512_40k_cityscapes.py`) for 19 classes: its parameter counts, its
state-dict layout (names and shapes) and its outputs under `seeded_state` weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdesbench.config import ModelConfig
from sdesbench.errors import ConfigError
from sdesbench.models import build_model, count_params
from sdesbench.models.mmseg import mmseg_to_ours

FIXTURE = json.loads((Path(__file__).resolve().parent / "fixtures" / "mmseg_d8.json").read_text())
NAMES = ("pspnet_r101_d8", "deeplabv3_r18_d8")


def seeded_state(layout: list, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic tensors for a state-dict layout [(name, shape)], drawn from one generator in sorted-name
    order: conv weights N(0, 2/fan_in), BN weights and running variances U(0.5, 1.5), biases and running
    means U(-0.1, 0.1), step counters 0. The fixture's outputs were computed by mmseg on these tensors."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(layout):
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(0)
        elif len(shape) > 1:
            out[name] = torch.randn(shape, generator=gen) * (2.0 / torch.Size(shape[1:]).numel()) ** 0.5
        elif name.endswith(("running_var", ".weight")):
            out[name] = 0.5 + torch.rand(shape, generator=gen)
        else:
            out[name] = 0.2 * torch.rand(shape, generator=gen) - 0.1
    return out


@pytest.fixture(scope="module")
def built():
    """Each network with its aux head, 19 classes, built once (the R101 takes seconds to initialise)."""
    return {name: build_model(ModelConfig(name=name, aux=True), 19) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_params_equal_mmseg(name, built):
    """mmseg 0.20.2's count, 19 classes: pspnet_r101_d8 67,967,622 with its FCN aux head (65,602,931 without),
    deeplabv3_r18_d8 13,986,374 (13,837,555)."""
    ref, model = FIXTURE["models"][name], built[name]
    assert count_params(model) == ref["params"]
    assert count_params(model) - count_params(model.aux_head) == ref["params_without_aux"]
    assert (FIXTURE["models"]["pspnet_r101_d8"]["params"], FIXTURE["models"]["deeplabv3_r18_d8"]["params"]) == (
        67_967_622, 13_986_374)


@pytest.mark.parametrize("name", NAMES)
def test_reproduces_mmseg_outputs_from_its_checkpoint(name, built, tmp_path):
    """mmseg's state dict (its names, as a segmentor checkpoint under `state_dict`) loads through
    `model.weights`, every tensor at its place, and the network then gives mmseg's logits, aux logits and
    stages (feature size, eval mode)."""
    ref = FIXTURE["models"][name]
    state = seeded_state(ref["layout"], FIXTURE["weights_seed"])
    ours = mmseg_to_ours(state, "psp" if name.startswith("psp") else "aspp")
    model = built[name]
    model.load_state_dict(ours, strict=True)  # the renaming covers every tensor, both ways
    path = tmp_path / "mmseg.pth"
    if name == "deeplabv3_r18_d8":  # through the file, as a user passes it (an MGD checkpoint's prefix included)
        torch.save({"state_dict": {f"student.{k}": v for k, v in state.items()}, "meta": {}}, path)
        model = build_model(ModelConfig(name=name, aux=True, pretrained=True, weights=str(path)),
                            FIXTURE["num_classes"])
        path.unlink()
        assert torch.equal(model.state_dict()["backbone.bn1.running_var"], state["backbone.stem.7.running_var"])
    model.eval()
    x = torch.randn(*FIXTURE["input_shape"], generator=torch.Generator().manual_seed(FIXTURE["input_seed"]))
    assert x.double().sum().item() == pytest.approx(FIXTURE["input_sum"], rel=1e-9)
    with torch.no_grad():
        out = model(x)
        logits = model.decoder(out["stages"])["logits"]
        aux = model.aux_head(out["stages"][-2])
    # bound: 1e-5 of the largest magnitude plus 1e-5 relative (summation order differs between CPUs; the
    # seeded weights let the R101's activations grow to ~4e7 through its 33 residual blocks)
    for key, got in (("logits", logits), ("aux", aux)):
        want = torch.tensor(ref[key])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    for got, want in zip(out["stages"], ref["stage_channel_mean"]):
        want = torch.tensor(want)
        torch.testing.assert_close(got.mean(dim=(2, 3)), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert out["decoder_feature"].shape[1] == model.decoder_channels == (512 if name.startswith("psp") else 128)
    h, w = FIXTURE["input_shape"][-2:]  # the declared layout (docs/models.md) is what the stages are
    assert [tuple(s.shape[1:]) for s in out["stages"]] == [
        (c, h // r, w // r) for c, r in zip(model.stage_channels, model.stage_strides)]
    assert model.stage_strides == [4, 8, 8, 8]


def test_imagenet_v1c_file_and_wrong_files(tmp_path):
    """open-mmlab's resnet18_v1c layout (the backbone's mmseg names without `backbone.`, plus `fc.*`) loads into
    the backbone from a folder; a file of another network, or pretrained without a file, is one line."""
    layout = [(k[len("backbone."):], s) for k, s in FIXTURE["models"]["deeplabv3_r18_d8"]["layout"]
              if k.startswith("backbone.")]
    state = seeded_state(layout, 5)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(state, tmp_path / "resnet18_v1c.pth")
    model = build_model(ModelConfig(name="deeplabv3_r18_d8", pretrained=True, weights=str(tmp_path)), 19)
    own = model.backbone.state_dict()
    assert torch.equal(own["conv1.0.weight"], state["stem.0.weight"])  # 3x3 3->32, stride 2
    assert torch.equal(own["conv1.6.weight"], state["stem.6.weight"])  # 3x3 32->64
    assert torch.equal(own["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    for bad in ({"stem.0.weight": torch.zeros(64, 3, 3, 3)}, None):
        if bad is not None:
            torch.save(bad, tmp_path / "resnet18_v1c.pth")
        with pytest.raises(ConfigError, match="model.weights") as e:
            build_model(ModelConfig(name="deeplabv3_r18_d8", pretrained=True,
                                    weights=str(tmp_path) if bad is not None else None), 19)
        assert len(str(e.value).splitlines()) == 1
    (tmp_path / "resnet18_v1c.pth").unlink()


def test_dilations_follow_mmseg():
    """ResNetV1c-D8: contract_dilation (first block of layer3 / layer4 at dilation 1 / 2, the others 2 / 4) and
    mmseg's BasicBlock, whose second 3x3 conv is never dilated."""
    r18 = build_model("deeplabv3_r18_d8", 19).backbone
    assert [r18.layer3[0].conv1.dilation, r18.layer3[1].conv1.dilation, r18.layer4[0].conv1.dilation,
            r18.layer4[1].conv1.dilation] == [(1, 1), (2, 2), (2, 2), (4, 4)]
    assert {b.conv2.dilation for layer in (r18.layer3, r18.layer4) for b in layer} == {(1, 1)}
