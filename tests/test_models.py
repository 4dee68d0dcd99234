"""Models of the paper: output contract, stage shapes, rebuilt decoders, Params vs the paper, FLOPs
counting against hand formulas, and the pretrained-weights errors."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, run_cli
from sdesbench.errors import ConfigError
from sdesbench.models import build_model, count_params
from sdesbench.models.enet import max_unpool2x
from sdesbench.models.experts import LightExpertDecoder
from sdesbench.measure.profile import build_profiled, count_gflops
from sdesbench.config import ModelConfig

# Documented stage layout of every model (docs/models.md): channels and strides of `stages`,
# channels of `decoder_feature`, and the stride of the decoder's logits before resizing.
LAYOUT = {
    "deeplabv3_resnet18": ([64, 128, 256, 512], [4, 8, 8, 8], 256, 8),
    "deeplabv3_resnet50": ([256, 512, 1024, 2048], [4, 8, 8, 8], 256, 8),
    "deeplabv3_resnet101": ([256, 512, 1024, 2048], [4, 8, 8, 8], 256, 8),
    "deeplabv3_mobilenetv2": ([24, 32, 96, 1280], [4, 8, 8, 8], 256, 8),
    "deeplabv3_efficientnet_b0": ([24, 40, 112, 320], [4, 8, 8, 8], 256, 8),
    "erfnet": ([16, 64, 128], [2, 4, 8], 16, 1),
    "esnet": ([16, 64, 128], [2, 4, 8], 16, 1),
    "enet": ([16, 64, 128, 128], [2, 4, 8, 8], 16, 1),
}

# The paper's Params (M): Table 2 (19 classes) and "Results on CamVid" (11 classes).
PAPER_PARAMS = {
    ("deeplabv3_resnet50", 19): 39.64, ("deeplabv3_resnet18", 19): 15.90, ("erfnet", 19): 2.07,
    ("esnet", 19): 1.66, ("enet", 19): 0.36, ("deeplabv3_mobilenetv2", 11): 12.65,
    ("deeplabv3_efficientnet_b0", 11): 7.31,
}

SIZE = 32  # a multiple of 8: every model's deepest stride


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_forward_backward_contract_and_rebuilt_decoder(name):
    torch.manual_seed(0)
    channels, strides, dec_channels, logit_stride = LAYOUT[name]
    model = build_model(name, 5).train()
    assert (model.stage_channels, model.stage_strides, model.decoder_channels) == (channels, strides, dec_channels)
    x = torch.randn(2, 3, SIZE, SIZE)
    labels = torch.randint(0, 5, (2, SIZE, SIZE))
    out = model(x)
    assert out["logits"].shape == (2, 5, SIZE, SIZE)
    assert out["aux"] is None
    assert [tuple(s.shape) for s in out["stages"]] == [(2, c, SIZE // s, SIZE // s) for c, s in zip(channels, strides)]
    assert out["decoder_feature"].shape[:2] == (2, dec_channels)
    F.cross_entropy(out["logits"], labels).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]

    # A rebuilt decoder reads the same stages and gives the same shapes, with its own weights.
    decoder = model.build_decoder(3)
    assert not {id(p) for p in decoder.parameters()} & {id(p) for p in model.parameters()}
    ref, new = model.decoder(out["stages"]), decoder([s.detach() for s in out["stages"]])
    assert new["decoder_feature"].shape == ref["decoder_feature"].shape
    assert new["logits"].shape == (2, 3, SIZE // logit_stride, SIZE // logit_stride)
    assert count_params(decoder) == count_params(model.build_decoder(3))


@pytest.mark.parametrize("name,classes", sorted(PAPER_PARAMS))
def test_params_match_paper_within_1_percent(name, classes):
    params_m = count_params(build_model(name, classes)) / 1e6
    assert abs(params_m - PAPER_PARAMS[name, classes]) / PAPER_PARAMS[name, classes] < 0.01, params_m


def test_light_expert_params_and_ens_t_total():
    # 1x1 conv 512->16 (no bias) + BN(16) + 1x1 conv 16->19 with bias
    expert = LightExpertDecoder(512, 19)
    assert count_params(expert) == 512 * 16 + 2 * 16 + 16 * 19 + 19
    out = expert([torch.randn(2, 512, 4, 8)])
    assert out["logits"].shape == (2, 19, 4, 8) and out["decoder_feature"].shape == (2, 16, 4, 8)
    ens_t = build_profiled("ens_t_resnet18", 19)
    assert count_params(ens_t) == count_params(build_model("deeplabv3_resnet18", 19)) + 4 * count_params(expert)
    assert abs(count_params(ens_t) / 1e6 - 15.94) / 15.94 < 0.01  # Table 2's Ens-T figure


def test_flops_single_conv_matches_formula():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=True).eval()
    # H*W*Cin*Cout*k*k multiply-adds (fvcore counts no bias adds)
    assert count_gflops(conv, (16, 24)) * 1e9 == pytest.approx(16 * 24 * 3 * 8 * 3 * 3)


def test_flops_light_expert_matches_formula():
    class OnImage(torch.nn.Module):  # the expert reading the image itself as its only stage
        def __init__(self):
            super().__init__()
            self.expert = LightExpertDecoder(3, 7)

        def forward(self, x):
            return self.expert([x])["logits"]

    h, w = 6, 10
    # conv 3->16: h*w*3*16; BatchNorm in eval with affine: 2 per element (h*w*16); conv 16->7: h*w*16*7
    expected = h * w * 3 * 16 + 2 * h * w * 16 + h * w * 16 * 7
    assert count_gflops(OnImage().eval(), (h, w)) * 1e9 == pytest.approx(expected)


def test_flops_scale_with_input_area():
    # fully convolutional, no global pooling: FLOPs at 4x the area are exactly 4x
    net = build_profiled("erfnet", 19)
    assert count_gflops(net, (32, 64)) == pytest.approx(4 * count_gflops(net, (16, 32)), rel=1e-9)


@pytest.mark.parametrize("name", ["enet", "erfnet"])
def test_handwritten_nets_accept_any_input_size(name):
    model = build_model(name, 4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 30, 45))["logits"].shape == (1, 4, 30, 45)


def test_enet_unpool_matches_torch_and_uses_encoder_indices():
    x = torch.randn(2, 4, 6, 8)
    pooled, idx = F.max_pool2d(x, 2, 2, return_indices=True)
    assert torch.equal(max_unpool2x(pooled, idx), F.max_unpool2d(pooled, idx, 2, 2))


@pytest.mark.parametrize("name", ["enet", "erfnet", "esnet"])
def test_handwritten_nets_refuse_pretrained(name):
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(name=name, pretrained=True), 19)
    assert len(str(e.value).splitlines()) == 1 and "no ImageNet weights" in str(e.value)


def test_pretrained_from_local_weights_file(tmp_path):
    # a full timm MobileNetV2 state dict stands in for downloaded ImageNet weights
    source = timm.create_model("mobilenetv2_100")
    path = tmp_path / "mobilenetv2_100.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(name="deeplabv3_mobilenetv2", pretrained=True, weights=str(path)), 11)
    assert model.pretrained
    assert torch.equal(model.backbone.conv_stem.weight, source.conv_stem.weight)
    assert torch.equal(model.conv_head[0].weight, source.conv_head.weight)  # the head conv feeding ASPP
    with pytest.raises(ConfigError, match="no such file"):
        build_model(ModelConfig(name="deeplabv3_resnet18", pretrained=True, weights=str(tmp_path / "no.pth")), 19)


def test_profile_cli_json_and_errors():
    proc = run_cli("profile", "--model", "enet", "--input", "32x64", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert set(row) >= {"model", "num_classes", "input_size", "params_m", "gflops", "paper_params_m", "paper_gflops"}
    assert (row["model"], row["num_classes"], row["input_size"]) == ("enet", 19, [32, 64])
    assert row["params_m"] == round(count_params(build_model("enet", 19)) / 1e6, 4)
    assert row["paper_params_m"] == 0.36 and row["paper_gflops"] is None  # FLOPs compared at 512x1024 only
    assert_one_line_error(run_cli("profile", "--model", "enet", "--input", "30x64"), "--input")
    assert_one_line_error(run_cli("profile", "--model", "enett"), "unknown model")
