"""Models of the paper: output contract, stage shapes, rebuilt decoders, Params vs the paper, FLOPs
counting against hand formulas, and the pretrained-weights errors."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, run_cli
from sdesbench.errors import ConfigError
from sdesbench.models import MODELS, build_model, count_params
from sdesbench.models.enet import max_unpool2x
from sdesbench.models.experts import LightExpertDecoder
from sdesbench.measure.profile import build_profiled, count_cirkd_gflops, count_gflops
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
    "pspnet_resnet18": ([64, 128, 256, 512], [4, 8, 8, 8], 128, 8),
    "pspnet_resnet18_vanilla": ([64, 128, 256, 512], [4, 8, 8, 8], 128, 8),
    "deeplabv3_resnet18_cirkd": ([64, 128, 256, 512], [4, 8, 8, 8], 128, 8),
    "deeplabv3_resnet101_cirkd": ([256, 512, 1024, 2048], [4, 8, 8, 8], 256, 8),
    "deeplabv3_mobilenetv2_cirkd": ([24, 32, 96, 320], [4, 8, 8, 8], 128, 8),
    "segformer_mit_b0": ([32, 64, 160, 256], [4, 8, 16, 32], 256, 4),
    "segformer_mit_b4": ([64, 128, 320, 512], [4, 8, 16, 32], 768, 4),
    "deeplabv3_r18_d8": ([64, 128, 256, 512], [4, 8, 8, 8], 128, 8),
    "pspnet_r101_d8": ([256, 512, 1024, 2048], [4, 8, 8, 8], 512, 8),
}

# The paper's Params (M): Table 2 (19 classes) and "Results on CamVid" (11 classes).
PAPER_PARAMS = {
    ("deeplabv3_resnet50", 19): 39.64, ("deeplabv3_resnet18", 19): 15.90, ("erfnet", 19): 2.07,
    ("esnet", 19): 1.66, ("enet", 19): 0.36, ("deeplabv3_mobilenetv2", 11): 12.65,
    ("deeplabv3_efficientnet_b0", 11): 7.31,
}

SIZE = 32  # a multiple of 8: every model's deepest stride


def test_every_registered_model_has_a_documented_layout():
    assert set(LAYOUT) == set(MODELS.names())


# MiT-B4 is built from the same modules as B0 with other widths and depths; its layout and a forward are
# checked in test_segformer_params_equal_cirkds_code, which builds it anyway (a backward through 64 M
# parameters would cost more than the rest of this test); PSPNet-R101-D8's layout and forward likewise in
# tests/test_mmseg_models.py (its stages and logits against mmseg's)
@pytest.mark.parametrize("name", sorted(set(LAYOUT) - {"segformer_mit_b4", "pspnet_r101_d8"}))
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
    assert row["params_m"] == round(count_params(build_model("enet", 19)) / 1e6, 6)
    assert row["paper_params_m"] == 0.36 and row["paper_gflops"] is None  # FLOPs compared at 512x1024 only
    assert_one_line_error(run_cli("profile", "--model", "enet", "--input", "30x64"), "--input")
    assert_one_line_error(run_cli("profile", "--model", "enett"), "unknown model")


# --- PSPNet-ResNet18 as CIRKD builds it (sdesbench/models/pspnet.py) -----------------------------------

CIRKD_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "cirkd_pspnet_resnet18.json"


def seeded_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Deterministic weights drawn from one generator in the order of the sorted state-dict names (so
    they depend on the names and shapes only, not on torch's init order): conv weights N(0, 2/fan_in),
    BatchNorm weights U(0.5, 1.5), running variances U(0.5, 1.5), biases and running means U(-0.1, 0.1).
    The CIRKD fixture was recorded by loading exactly these tensors into CIRKD's own PSPNet."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if not t.is_floating_point():
                continue
            if t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith(("running_var", ".weight")):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            else:
                t.copy_(0.2 * torch.rand(t.shape, generator=gen) - 0.1)


def test_pspnet_bins_output_stride_8_and_aux_head():
    model = build_model(ModelConfig(name="pspnet_resnet18", aux=True), 7).eval()
    assert model.decoder.ppm.bins == (1, 2, 3, 6)
    pooled = []
    hooks = [branch[0].register_forward_hook(lambda m, i, o: pooled.append(tuple(o.shape[-2:])))
             for branch in model.decoder.ppm.branches]
    x = torch.randn(1, 3, 40, 56)  # not a multiple of 16: feature map 5 x 7 at output stride 8
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    assert pooled == [(1, 1), (2, 2), (3, 3), (6, 6)]
    assert out["decoder_feature"].shape == (1, 128, 40 // 8, 56 // 8)
    assert out["stages"][-1].shape[-2:] == out["stages"][-2].shape[-2:] == (5, 7)  # layer3, layer4 dilated
    assert out["logits"].shape == out["aux"].shape == (1, 7, 40, 56)
    # the aux head reads layer3 (256 channels): CIRKD's _FCNHead 3x3 256->64, BN, ReLU, dropout, 1x1 -> C
    assert count_params(model.aux_head) == 256 * 64 * 9 + 2 * 64 + 64 * 7 + 7
    with torch.no_grad():
        assert build_model("pspnet_resnet18", 7).eval()(x)["aux"] is None


def test_pspnet_params_equal_hand_count():
    classes = 19
    model = build_model(ModelConfig(name="pspnet_resnet18"), classes)
    c, r = 512, 512 // 4  # layer4 channels, branch channels (reduction 4)
    # each bin: 1x1 conv c->r without bias + BN(r) (weight and bias)
    ppm = 4 * (c * r + 2 * r)
    assert count_params(model.decoder.ppm) == ppm == 263_168
    # then 3x3 conv (c + 4r)->128 without bias + BN(128), and the 1x1 classifier 128->C with bias
    head = ppm + (c + 4 * r) * 128 * 9 + 2 * 128 + 128 * classes + classes
    assert count_params(model.decoder) == head

    def basic_block(cin, cout, project):  # two 3x3 convs + 2 BN, a 1x1 projection + BN when the shape changes
        return cin * cout * 9 + cout * cout * 9 + 4 * cout + (cin * cout + 2 * cout if project else 0)

    stem = 3 * 64 * 9 + 64 * 64 * 9 + 64 * 128 * 9 + 2 * (64 + 64 + 128)  # CIRKD's deep stem, 3x3 convs
    layers = (basic_block(128, 64, True) + basic_block(64, 64, False) + basic_block(64, 128, True)
              + basic_block(128, 128, False) + basic_block(128, 256, True) + basic_block(256, 256, False)
              + basic_block(256, 512, True) + basic_block(512, 512, False))
    assert count_params(model.backbone) == stem + layers == 11_324_992  # = CIRKD's resnet18_v1s
    assert count_params(model) == stem + layers + head
    vanilla = build_model("pspnet_resnet18_vanilla", classes)  # 7x7 stem 3->64; layer1 needs no projection
    assert count_params(vanilla) == count_params(model) - stem - (128 - 64) * 64 * 9 - (128 * 64 + 2 * 64) \
        + 3 * 64 * 49 + 2 * 64


def test_pspnet_reproduces_cirkd_outputs():
    """CIRKD's own PSPNet-ResNet18 (aux=True), given the tensors of `seeded_weights`, produced the
    recorded logits, aux logits and features (feature size, before any resizing)."""
    fixture = json.loads(CIRKD_FIXTURE.read_text())
    model = build_model(ModelConfig(name="pspnet_resnet18", aux=True), fixture["num_classes"]).eval()
    seeded_weights(model, fixture["weights_seed"])
    x = torch.randn(*fixture["input_shape"], generator=torch.Generator().manual_seed(fixture["input_seed"]))
    assert x.double().sum().item() == pytest.approx(fixture["input_sum"], rel=1e-9)
    with torch.no_grad():
        out = model(x)
        logits = model.decoder(out["stages"])["logits"]
        aux = model.aux_head(out["stages"][-2])
    ref = {k: torch.tensor(fixture[k]) for k in ("logits", "aux", "feature_channel_mean")}
    # Random-init logits reach 137 (aux 94) and pass near 0, where an element-wise 1e-4 is tighter than
    # float32 through 20 layers allows: the summation order of the CPU's kernels moves elements by up to
    # 2.7e-4 (logits) and 1.6e-4 (aux), measured on an AMD EPYC in a process of its own (1.2e-4, one
    # element of 1824 over 1e-4, in a `make test` worker on the same machine). The bound is therefore 1e-5
    # of the outputs' largest magnitude, plus 1e-5 relative.
    for name, got in (("logits", logits), ("aux", aux)):
        torch.testing.assert_close(got, ref[name], rtol=1e-5, atol=1e-5 * ref[name].abs().max().item())
    torch.testing.assert_close(out["decoder_feature"].mean(dim=(2, 3)), ref["feature_channel_mean"], rtol=1e-4,
                               atol=1e-5)


def test_pspnet_loads_cirkd_deep_stem_weights(tmp_path):
    """A file laid out as CIRKD's resnet18-imagenet.pth (its names and shapes, recorded) loads into the
    deep-stem backbone, each tensor at its renamed place; wrong files fail in one line."""
    layout = json.loads(CIRKD_FIXTURE.read_text())["resnet18_v1s_state"]
    gen = torch.Generator().manual_seed(3)
    state = {name: torch.randn(shape, generator=gen) if shape else torch.tensor(5) for name, shape in layout}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)  # a classifier is ignored
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(name="pspnet_resnet18", pretrained=True, weights=str(path)), 19)
    own = model.backbone.state_dict()
    assert torch.equal(own["conv1.0.weight"], state["conv1.weight"])  # 3x3 3->64, stride 2
    assert torch.equal(own["conv1.4.running_var"], state["bn2.running_var"])
    assert torch.equal(own["conv1.6.weight"], state["conv3.weight"])  # 3x3 64->128
    assert torch.equal(own["bn1.weight"], state["bn3.weight"])  # the stem's last BN (128)
    assert torch.equal(own["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    assert len(own) == len(layout)
    with pytest.raises(ConfigError, match="does not fit") as e:  # timm's 7x7-stem resnet18: not this network
        torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "tv.pth")
        build_model(ModelConfig(name="pspnet_resnet18", pretrained=True, weights=str(tmp_path / "tv.pth")), 19)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="model.weights") as e:  # pretrained without a file: no timm weights
        build_model(ModelConfig(name="pspnet_resnet18", pretrained=True), 19)
    assert len(str(e.value).splitlines()) == 1 and "pspnet_resnet18_vanilla" in str(e.value)


def test_cirkd_counter_ignores_dilation_and_counts_convs_only():
    # CIRKD's utils/flops.py: out = (in + 2p - k) // s + 1 without the dilation; BN, pooling free
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=2, dilation=2), torch.nn.BatchNorm2d(8),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    h, w = 16, 24
    expected = 3 * 8 * 9 * (h + 4 - 3 + 1) * (w + 4 - 3 + 1) + 8 * 5  # 18 x 26 outputs counted, not 16 x 24
    assert count_cirkd_gflops(net, (h, w)) * 1e9 == expected


@pytest.mark.parametrize("name, params_m, gflops", [("pspnet_resnet18", 12.9, 507.4),
                                                     ("deeplabv3_resnet18_cirkd", 13.6, 572.0)])
def test_profile_cirkd_reference_for_cirkds_students(name, params_m, gflops):
    """`profile --reference cirkd`: Params and FLOPs (CIRKD's counter) within 1% of CIRKD Table 1's
    figures (docs/models.md), at 1024x2048 with the aux head, as CIRKD counts it."""
    proc = run_cli("profile", "--reference", "cirkd", "--model", name, "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert (row["reference"], row["input_size"], row["aux"], row["counter"]) == ("cirkd", [1024, 2048], True, "cirkd")
    assert (row["paper_params_m"], row["paper_gflops"]) == (params_m, gflops)
    assert row["params_m"] == round(count_params(build_model(ModelConfig(name=name, aux=True), 19)) / 1e6, 6)
    assert abs(row["params_rel_diff"]) < 0.01 and abs(row["gflops_rel_diff"]) < 0.01, row
    assert row["gflops_rel_diff"] == pytest.approx((row["cirkd_counter_gflops"] - gflops) / gflops, abs=1e-6)
    assert 0 < row["gflops"] < row["cirkd_counter_gflops"]  # fvcore: dilated convs at their true output size
    assert_one_line_error(run_cli("profile", "--reference", "cirkdd"), "--reference")


# --- DeepLabV3 as CIRKD builds it (sdesbench/models/deeplabv3_cirkd.py) ----------------------------------

CIRKD_DEEPLAB_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "cirkd_deeplabv3.json"


@pytest.mark.parametrize("name", ["deeplabv3_resnet18_cirkd", "deeplabv3_mobilenetv2_cirkd"])
def test_cirkd_deeplabv3_reproduces_cirkd_outputs(name):
    """CIRKD's own DeepLabV3 (7e0d21f), given the tensors of `seeded_weights`, produced the recorded logits,
    aux logits and `x_feat_after_aspp` (the fixture's recipe)."""
    fixture = json.loads(CIRKD_DEEPLAB_FIXTURE.read_text())
    aux = "resnet" in name
    model = build_model(ModelConfig(name=name, aux=aux), fixture["num_classes"]).eval()
    seeded_weights(model, fixture["weights_seed"])
    x = torch.randn(*fixture["input_shape"], generator=torch.Generator().manual_seed(fixture["input_seed"]))
    assert x.double().sum().item() == pytest.approx(fixture["input_sum"], rel=1e-9)
    ref = fixture["models"][name]
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model.decoder(out["stages"])["logits"], torch.tensor(ref["logits"]),
                                   rtol=1e-4, atol=1e-4)
        if aux:
            torch.testing.assert_close(model.aux_head(out["stages"][-2]), torch.tensor(ref["aux"]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["decoder_feature"].mean(dim=(2, 3)), torch.tensor(ref["feature_channel_mean"]),
                               rtol=1e-4, atol=1e-5)


def test_cirkd_deeplabv3_params_equal_cirkds_code():
    """Parameter counts of CIRKD's own networks (fixture, counted on its code) and CIRKD Table 1's figures."""
    counts = json.loads(CIRKD_DEEPLAB_FIXTURE.read_text())["params"]
    r18 = count_params(build_model(ModelConfig(name="deeplabv3_resnet18_cirkd", aux=True), 19))
    r101 = count_params(build_model(ModelConfig(name="deeplabv3_resnet101_cirkd", aux=True), 19))
    mbv2 = count_params(build_model("deeplabv3_mobilenetv2_cirkd", 19))
    assert (r18, r101, mbv2) == (counts["deeplabv3_resnet18_cirkd (aux)"], counts["deeplabv3_resnet101_cirkd (aux)"],
                                 counts["deeplabv3_mobilenetv2_cirkd"])
    assert (round(r18 / 1e6, 1), round(r101 / 1e6, 1), round(mbv2 / 1e6, 1)) == (13.6, 61.1, 3.2)  # CIRKD Table 1
    # the head's width by hand (ResNet-18: 128): ASPP's four convs and pooling, projection 5*128->128, 3x3 conv,
    # each BN 2*128, classifier 128->19 with bias
    w, c = 128, 512
    aspp = c * w + 3 * c * w * 9 + c * w + 5 * 2 * w + 5 * w * w + 2 * w
    head = aspp + w * w * 9 + 2 * w + w * 19 + 19
    assert count_params(build_model("deeplabv3_resnet18_cirkd", 19).decoder) == head
    with pytest.raises(ConfigError, match="no auxiliary head"):
        build_model(ModelConfig(name="deeplabv3_mobilenetv2_cirkd", aux=True), 19)


def test_cirkd_mobilenetv2_loads_csail_layout_in_order(tmp_path):
    """CIRKD's mobilenetv2-imagenet.pth (CSAIL's names, recorded; plus the 1x1 conv and classifier such a file
    holds) loads into timm's backbone tensor for tensor; pairs checked by hand from both architectures."""
    layout = json.loads(CIRKD_DEEPLAB_FIXTURE.read_text())["mobilenetv2_features_state"]
    gen = torch.Generator().manual_seed(5)
    state = {name: torch.randn(shape, generator=gen) if shape else torch.tensor(7) for name, shape in layout}
    state["features.18.0.weight"], state["classifier.1.weight"] = torch.randn(1280, 320, 1, 1), torch.randn(1000, 1280)
    (tmp_path / "cirkd").mkdir()
    torch.save(state, tmp_path / "cirkd" / "mobilenetv2-imagenet.pth")
    # a folder of CIRKD's files: each network takes its own
    model = build_model(ModelConfig(name="deeplabv3_mobilenetv2_cirkd", pretrained=True, weights=str(tmp_path / "cirkd")), 19)
    own = model.backbone.state_dict()
    assert torch.equal(own["conv_stem.weight"], state["features.0.0.weight"])  # 3x3 3->32, stride 2
    assert torch.equal(own["blocks.0.0.conv_dw.weight"], state["features.1.conv.0.weight"])  # t=1: dw first
    assert torch.equal(own["blocks.1.0.conv_dw.weight"], state["features.2.conv.3.weight"])  # 24: pw, bn, relu, dw
    assert torch.equal(own["blocks.3.3.bn3.running_var"], state["features.10.conv.7.running_var"])  # 64, 4th block
    assert torch.equal(own["blocks.6.0.conv_pwl.weight"], state["features.17.conv.6.weight"])  # the 320 block
    with pytest.raises(ConfigError, match="has no resnet18-imagenet.pth") as e:
        build_model(ModelConfig(name="deeplabv3_resnet18_cirkd", pretrained=True, weights=str(tmp_path / "cirkd")), 19)
    assert len(str(e.value).splitlines()) == 1
    del state["features.5.conv.0.weight"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(ConfigError, match="does not fit the MobileNetV2"):
        build_model(ModelConfig(name="deeplabv3_mobilenetv2_cirkd", pretrained=True, weights=str(tmp_path / "short.pth")), 19)
    with pytest.raises(ConfigError, match="model.weights"):  # pretrained without a file: timm has no such weights
        build_model(ModelConfig(name="deeplabv3_resnet101_cirkd", pretrained=True), 19)


# --- SegFormer as CIRKD builds it (sdesbench/models/segformer.py) -----------------------------------------

CIRKD_SEGFORMER_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "cirkd_segformer.json"


def mit_params_by_hand(widths, depths, decoder_dim, classes, sr_ratios=(8, 4, 2, 1), mlp_ratio=4):
    """SegFormer's parameter count from its description (Xie et al. 2021, Sec. 3; CIRKD's fuse conv with bias)."""
    total, cin = 0, 3
    for i, (c, depth, r) in enumerate(zip(widths, depths, sr_ratios)):
        k = 7 if i == 0 else 3
        total += k * k * cin * c + c + 2 * c  # patch-embedding conv with bias + LayerNorm
        h = mlp_ratio * c
        attn = (c * c + c) + (2 * c * c + 2 * c) + (c * c + c)  # q, kv, proj with biases
        if r > 1:
            attn += r * r * c * c + c + 2 * c  # reduction conv + its LayerNorm
        ffn = (c * h + h) + (9 * h + h) + (h * c + c)  # fc1, depth-wise 3x3 with bias, fc2
        total += depth * (2 * c + attn + 2 * c + ffn) + 2 * c  # blocks (two norms each), then the stage norm
        cin = c
    d = decoder_dim
    total += sum(c * d + d for c in widths) + 4 * d * d + d + 2 * d + d * classes + classes
    return total


def test_segformer_params_equal_cirkds_code():
    """CIRKD's own MiT_B0 / MiT_B4 (fixture: counted on its code), the count from the architecture by hand,
    and ours agree: 3,719,283 and 64,008,403 at 19 classes."""
    counts = json.loads(CIRKD_SEGFORMER_FIXTURE.read_text())["params"]
    model = build_model("segformer_mit_b4", 19).eval()
    b0, b4 = count_params(build_model("segformer_mit_b0", 19)), count_params(model)
    assert (b0, b4) == (counts["MiT_B0"], counts["MiT_B4"]) == (3_719_283, 64_008_403)
    assert b0 == mit_params_by_hand((32, 64, 160, 256), (2, 2, 2, 2), 256, 19)
    assert b4 == mit_params_by_hand((64, 128, 320, 512), (3, 8, 27, 3), 768, 19)
    channels, strides, dec_channels, logit_stride = LAYOUT["segformer_mit_b4"]
    assert (model.stage_channels, model.stage_strides, model.decoder_channels) == (channels, strides, dec_channels)
    with torch.no_grad():
        out = model(torch.randn(1, 3, SIZE, SIZE))
    assert [tuple(s.shape) for s in out["stages"]] == [(1, c, SIZE // s, SIZE // s) for c, s in zip(channels, strides)]
    assert out["decoder_feature"].shape == (1, dec_channels, SIZE // logit_stride, SIZE // logit_stride)
    assert out["logits"].shape == (1, 19, SIZE, SIZE) and out["aux"] is None
    with pytest.raises(ConfigError, match="no auxiliary head"):
        build_model(ModelConfig(name="segformer_mit_b0", aux=True), 19)


def test_segformer_reproduces_cirkd_outputs():
    """CIRKD's own SegFormer MiT-B0 (2d8ad0f), given the tensors of `seeded_weights`, produced the recorded
    logits (stride 4), fused-feature and stage channel means (the fixture's recipe)."""
    fixture = json.loads(CIRKD_SEGFORMER_FIXTURE.read_text())
    model = build_model("segformer_mit_b0", fixture["num_classes"]).eval()
    seeded_weights(model, fixture["weights_seed"])
    x = torch.randn(*fixture["input_shape"], generator=torch.Generator().manual_seed(fixture["input_seed"]))
    assert x.double().sum().item() == pytest.approx(fixture["input_sum"], rel=1e-9)
    with torch.no_grad():
        out = model(x)
        logits = model.decoder(out["stages"])["logits"][0]
    ref = torch.tensor(fixture["logits"])
    # bitwise equal in the recording process; the bound allows other CPUs' summation orders (float32 through
    # 8 blocks and softmaxes: 1e-5 of the largest magnitude, plus 1e-5 relative), and the 8-digit recording
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert out["logits"].shape[-2:] == x.shape[-2:] and logits.shape[-2:] == (16, 24)
    torch.testing.assert_close(out["decoder_feature"].mean(dim=(2, 3))[0], torch.tensor(fixture["feature_channel_mean"]),
                               rtol=1e-4, atol=1e-5)
    for got, want in zip(out["stages"], fixture["stage_channel_means"]):
        torch.testing.assert_close(got.mean(dim=(2, 3))[0], torch.tensor(want), rtol=1e-4, atol=1e-5)


def mmseg_layout(nvlabs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An NVlabs MiT state dict as mmsegmentation's `tools/model_converters/mit2mmseg.py` writes it (its rules
    restated: q and kv concatenated into `attn.attn.in_proj_*`, fc1/fc2 as 1x1 convs, stage s -> `layers.{s-1}`)."""
    out = {}
    for k, v in nvlabs.items():
        head, rest = k.split(".", 1)
        if head.startswith("patch_embed"):
            out[f"layers.{int(head[-1]) - 1}.0.{rest.replace('proj.', 'projection.')}"] = v
        elif head.startswith("norm"):
            out[f"layers.{int(head[-1]) - 1}.2.{rest}"] = v
        elif head.startswith("block"):
            prefix = f"layers.{int(head[-1]) - 1}.1."
            if ".attn.q." in k:
                out[prefix + rest.replace("attn.q.", "attn.attn.in_proj_")] = torch.cat([v, nvlabs[k.replace(".q.", ".kv.")]])
            elif ".attn.proj." in k:
                out[prefix + rest.replace("attn.proj.", "attn.attn.out_proj.")] = v
            elif ".mlp." in k:
                rest = rest.replace("mlp.fc1.", "ffn.layers.0.").replace("mlp.dwconv.dwconv.", "ffn.layers.1.")
                rest = rest.replace("mlp.fc2.", "ffn.layers.4.")
                out[prefix + rest] = v[..., None, None] if rest.endswith(("0.weight", "4.weight")) else v
            elif ".attn.kv." not in k:
                out[prefix + rest] = v
    return out


def test_segformer_loads_nvlabs_mmseg_and_cirkd_layouts(tmp_path):
    """Files laid out as NVlabs' mit_b0.pth (CIRKD's encoder names, recorded, plus the ImageNet head), as
    mmsegmentation's converted MiT, and as CIRKD's trained SegFormer checkpoint load tensor for tensor;
    wrong files fail in one line."""
    layout = json.loads(CIRKD_SEGFORMER_FIXTURE.read_text())["mit_b0_state"]
    gen = torch.Generator().manual_seed(4)
    cirkd = {name: torch.randn(shape, generator=gen) if shape else torch.tensor(9) for name, shape in layout}
    encoder = {k: v for k, v in cirkd.items() if not k.startswith("linear_")}
    nvlabs = {**encoder, "head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)}
    torch.save(nvlabs, tmp_path / "mit_b0.pth")
    torch.save({"state_dict": mmseg_layout(encoder)}, tmp_path / "mmseg_mit_b0.pth")
    torch.save(cirkd, tmp_path / "segformer_MiT_B0_citys_best_model.pth")

    def load(file, classes=19):
        return build_model(ModelConfig(name="segformer_mit_b0", pretrained=True, weights=str(tmp_path / file)), classes)

    fresh = build_model("segformer_mit_b0", 19).decoder.state_dict()
    for file in ("mit_b0.pth", "mmseg_mit_b0.pth", "."):  # the encoder (a folder: its mit_b0.pth); decoder initialised
        model = load(file)
        own = model.backbone.state_dict()
        assert len(own) == len(encoder) and all(torch.equal(own[k], v) for k, v in encoder.items()), file
        assert torch.equal(model.decoder.state_dict()["linear_fuse.1.weight"], fresh["linear_fuse.1.weight"])
        assert not torch.equal(model.decoder.state_dict()["linear_c1.proj.weight"], cirkd["linear_c1.proj.weight"])
    model = load("segformer_MiT_B0_citys_best_model.pth")  # the whole network
    own = {k.split(".", 1)[1]: v for k, v in model.state_dict().items()}
    assert own.keys() == cirkd.keys() and all(torch.equal(own[k], v) for k, v in cirkd.items())
    seven = load("segformer_MiT_B0_citys_best_model.pth", classes=7)  # another dataset: all but the classifier
    assert torch.equal(seven.decoder.linear_fuse[0].weight, cirkd["linear_fuse.0.weight"])
    assert seven.decoder.linear_pred.weight.shape[0] == 7
    del encoder["block2.1.attn.kv.weight"]
    torch.save(encoder, tmp_path / "short.pth")
    with pytest.raises(ConfigError, match="does not fit the MiT-B0 backbone") as e:
        load("short.pth")
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="mit_b0.pth") as e:  # pretrained without a file: timm has no MiT
        build_model(ModelConfig(name="segformer_mit_b0", pretrained=True), 19)
    assert len(str(e.value).splitlines()) == 1


def test_segformer_flops_count_attention_matmuls():
    """fvcore counts the two attention matmuls of every block (q k^T and attention x v: 2 N M C multiply-adds
    for N queries, M = N / sr^2 keys, C channels), and leaves softmax, GELU and the scaling uncounted
    (docs/models.md); `profile` prints the exact parameter count, 3.719283 M."""
    from typer.testing import CliRunner

    from sdesbench.cli import app

    h, w = 64, 128
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice from fvcore's import and tracing
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(build_profiled("segformer_mit_b0", 19), torch.zeros(1, 3, h, w))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_op = analysis.by_operator()
    expected = 0
    for c, depth, sr, stride in zip((32, 64, 160, 256), (2, 2, 2, 2), (8, 4, 2, 1), (4, 8, 16, 32)):
        n = (h // stride) * (w // stride)
        expected += depth * 2 * n * (n // sr ** 2) * c
    assert by_op["matmul"] == expected
    assert set(by_op) == {"conv", "linear", "matmul", "layer_norm", "batch_norm", "upsample_bilinear2d"}
    assert {"aten::softmax", "aten::gelu"} <= set(analysis.unsupported_ops())
    result = CliRunner().invoke(app, ["profile", "--model", "segformer_mit_b0", "--input", f"{h}x{w}"])
    assert result.exit_code == 0, result.output
    assert "3.719283" in result.output
