"""`deeplabv3:timm/<name>`: any timm backbone timm can dilate, under torchvision's DeepLabV3 head at
output stride 8, accepted wherever a model name is (registry, configuration, teacher, `profile`), with
one-line errors for names timm does not know or cannot dilate, and ImageNet weights from a local file."""
from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import run_cli
from sdesbench.config import ModelConfig, TrainConfig
from sdesbench.engine import step
from sdesbench.engine.configure import build_config
from sdesbench.methods.base import StepInfo
from sdesbench.errors import ConfigError
from sdesbench.models import MODELS, build_model
from sdesbench.models.deeplabv3 import cached_weights
from sdesbench.measure.profile import profile_rows

SIZE = 32
# timm's documented feature levels of these networks at strides 4, 8, 16, 32 (the stride-2 stem level
# dropped); dilated, the last three are at stride 8
EXPECTED = {"resnet18": [64, 128, 256, 512], "mobilenetv3_large_100": [24, 40, 112, 960]}


@pytest.mark.parametrize("timm_name", sorted(EXPECTED))
def test_output_dict_shapes_and_strides(timm_name):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=f"deeplabv3:timm/{timm_name}", aux=True), 5).train()
    assert (model.stage_channels, model.stage_strides, model.decoder_channels) == (EXPECTED[timm_name], [4, 8, 8, 8], 256)
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert set(out) == {"logits", "aux", "decoder_feature", "stages"}
    assert out["logits"].shape == out["aux"].shape == (2, 5, SIZE, SIZE)
    assert [tuple(s.shape) for s in out["stages"]] == [(2, c, SIZE // s, SIZE // s)
                                                       for c, s in zip(EXPECTED[timm_name], [4, 8, 8, 8])]
    assert out["decoder_feature"].shape == (2, 256, SIZE // 8, SIZE // 8)
    F.cross_entropy(out["logits"], torch.randint(0, 5, (2, SIZE, SIZE))).backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert model.build_decoder(3)(out["stages"])["logits"].shape == (2, 3, SIZE // 8, SIZE // 8)


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert len(text.splitlines()) == 1, text
    return text


def test_unknown_undilatable_and_malformed_names_are_one_line_errors():
    with pytest.raises(ConfigError) as e:
        MODELS.get("deeplabv3:timm/resnet181")
    assert "timm has no model 'resnet181'" in one_line(e) and "resnet18" in one_line(e).split("close matches:")[1]
    with pytest.raises(ConfigError) as e:  # a transformer: timm has no dilation for it
        MODELS.get("deeplabv3:timm/vit_tiny_patch16_224")
    assert "cannot dilate this backbone to output stride 8" in one_line(e)
    with pytest.raises(ConfigError) as e:  # accepts output_stride only to refuse anything but 32
        MODELS.get("deeplabv3:timm/ghostnet_100")
    assert "cannot dilate" in one_line(e) and "dilation not supported" in one_line(e)
    with pytest.raises(ConfigError) as e:
        MODELS.get("deeplabv3:resnet18")
    assert "expected deeplabv3:timm/<timm model name>" in one_line(e)
    with pytest.raises(ConfigError) as e:  # an unknown family: the usual error, which shows the form
        MODELS.get("fcn:timm/resnet18")
    assert "unknown model 'fcn:timm/resnet18'" in one_line(e) and "deeplabv3:timm/<name>" in one_line(e)
    assert "deeplabv3:timm/resnet18" in MODELS and "deeplabv3:timm/vit_tiny_patch16_224" not in MODELS
    assert not any(":" in n for n in MODELS.names())  # the open family is not listed as names


def test_weights_from_a_local_file_and_the_offline_message(tmp_path, monkeypatch):
    # a full timm ConvNeXt state dict stands in for downloaded ImageNet weights: its `features_only`
    # wrapper renames `stages.0` to `stages_0`, which timm's own loader maps
    source = timm.create_model("convnext_atto")
    path = tmp_path / "convnext_atto.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(name="deeplabv3:timm/convnext_atto", pretrained=True, weights=str(path)), 5)
    assert model.pretrained
    assert torch.equal(model.backbone.stem_0.weight, source.stem[0].weight)
    assert torch.equal(model.backbone.stages_3.blocks[1].conv_dw.weight, source.stages[3].blocks[1].conv_dw.weight)
    with pytest.raises(ConfigError) as e:  # another network's file
        build_model(ModelConfig(name="deeplabv3:timm/resnet18", pretrained=True, weights=str(path)), 5)
    assert one_line(e).startswith(f"model.weights: {path} does not fit backbone resnet18")
    if cached_weights("resnet18") is None:  # no network here: the line that says how to give the file
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(ConfigError) as e:
            build_model(ModelConfig(name="deeplabv3:timm/resnet18", pretrained=True), 5)
        assert "could not load ImageNet weights for resnet18" in one_line(e) and "model.weights=" in one_line(e)


def test_student_and_teacher_in_a_run_configuration_and_a_training_step():
    cfg = build_config({"model": {"name": "deeplabv3:timm/mobilenetv3_large_100"}, "method": {"name": "kl"},
                        "teacher": {"model": "deeplabv3:timm/resnet18"}})
    assert (cfg.model.name, cfg.teacher.model) == ("deeplabv3:timm/mobilenetv3_large_100", "deeplabv3:timm/resnet18")
    with pytest.raises(ConfigError) as e:
        build_config({"model": {"name": "deeplabv3:timm/densenet121"}})
    assert "cannot dilate" in one_line(e)
    learner = step.random_learner(cfg.model.name, "kl", 11, train=TrainConfig(iters=2), teacher_model=cfg.teacher.model)
    terms = step.train_step(learner, torch.randn(2, 3, SIZE, SIZE), torch.randint(0, 11, (2, SIZE, SIZE)), StepInfo(0, 2))
    assert set(terms) >= {"kd"} and all(torch.isfinite(v) for v in terms.values()), terms


def test_profile_cli():
    proc = run_cli("profile", "--model", "deeplabv3:timm/resnet18", "--input", "32x32", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["model"] == "deeplabv3:timm/resnet18" and row["params_m"] > 0
    with pytest.raises(ConfigError) as e:  # the profile's own name check goes through the registry too
        profile_rows("deeplabv3:timm/swin_tiny_patch4_window7_224", (32, 32), 5)
    assert "cannot dilate" in one_line(e)
