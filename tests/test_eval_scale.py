"""Evaluation at a chosen scale (eval.scale / eval.size, `sdesbench eval --scale`) against a hand-resized one."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, assert_one_line_error, run_cli
from sdesbench.config import RunConfig
from sdesbench.engine.configure import build_config
from sdesbench.data.base import EvalView
from sdesbench.data.tiny import TinyScenes
from sdesbench.engine.evaluate import evaluate
from sdesbench.engine.step import random_learner
from sdesbench.io import load_checkpoint
from sdesbench.errors import ConfigError
from sdesbench.models import build_model


def hand_miou(preds, labels, num_classes=11):
    """Confusion matrix by explicit counting, then mIoU over classes with a non-empty union."""
    mat = [[0] * num_classes for _ in range(num_classes)]
    for pred, label in zip(preds, labels):
        for p, t in zip(pred.flatten().tolist(), label.flatten().tolist()):
            if t != 255:
                mat[t][p] += 1
    ious = []
    for c in range(num_classes):
        tp = mat[c][c]
        union = sum(mat[c]) + sum(row[c] for row in mat) - tp
        if union > 0:
            ious.append(tp / union)
    return sum(ious) / len(ious)


def resized_logits(model, image, hw):
    """Resize the normalised image with interpolate, run the model, resize its logits to the label size."""
    out = model(F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False, antialias=True))
    return F.interpolate(out["logits"], size=image.shape[-2:], mode="bilinear", align_corners=False), out


@torch.no_grad()
def test_scaled_evaluation_matches_hand_resized_one():
    unit = random_learner("deeplabv3_resnet18", "sdes", 11, {"n_experts": 2}).plain_unit
    model, method = unit.model.eval(), unit.method.eval()
    torch.nn.init.zeros_(model.decoder.classifier.bias)  # else the random model predicts one class everywhere
    view = EvalView(TinyScenes(None, "val"), max_images=6)
    got = evaluate(model, view, 11, torch.device("cpu"), method=method, scale=0.5)
    preds, ens_preds, labels = [], [], []
    lookup = torch.full((256,), -1)
    for n, group in enumerate(method.groups):
        lookup[torch.tensor(group)] = n
    for i in range(len(view)):
        image, label = view[i]  # 64x64 -> 32x32 input
        logits, out = resized_logits(model, image, (32, 32))
        preds.append(logits.argmax(1)[0])
        ens = logits.clone()  # Eq. 4 at the label's resolution: expert n where the label is in Psi_n
        for n, expert in enumerate(method.experts):
            up = F.interpolate(expert(out["stages"])["logits"], size=(64, 64), mode="bilinear", align_corners=False)
            ens = torch.where((lookup[label] == n)[None, None], up, ens)
        ens_preds.append(ens.argmax(1)[0])
        labels.append(label)
    assert len(torch.cat(preds).unique()) > 2  # a non-trivial confusion matrix
    assert got["student"]["miou"] == pytest.approx(hand_miou(preds, labels), abs=1e-12)
    assert got["ens_t"]["miou"] == pytest.approx(hand_miou(ens_preds, labels), abs=1e-12)
    whole = evaluate(model, view, 11, torch.device("cpu"))["student"]["miou"]
    assert whole != got["student"]["miou"]  # the scale is applied, not ignored
    by_size = evaluate(model, view, 11, torch.device("cpu"), size=(32, 32))["student"]["miou"]
    assert by_size == got["student"]["miou"]


def test_eval_scale_config_checks_and_hash():
    assert build_config({}, ["eval.scale=1.0"]).identity_hash() == build_config({}).identity_hash()
    assert build_config({}, ["eval.scale=0.5"]).identity_hash() != build_config({}).identity_hash()
    with pytest.raises(ConfigError, match="exclude each other"):
        build_config({}, ["eval.scale=0.5", "eval.size=[32, 32]"])
    with pytest.raises(ConfigError, match="eval.scale=0.0 is out of range"):
        build_config({}, ["eval.scale=0"])


def test_eval_command_scale_and_size(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--iters", "2", "--out", str(out), "--set", "eval.scale=0.5", *FAST)
    assert proc.returncode == 0, proc.stderr
    ckpt = out / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt)
    model = build_model("deeplabv3_resnet18", 11)
    model.load_state_dict(state["model"])
    view = EvalView(TinyScenes(None, "val"))
    expected = evaluate(model, view, 11, torch.device("cpu"), scale=0.5)["student"]["miou"]
    runs = {args: run_cli("eval", str(ckpt), "--json", "--device", "cpu", *args)
            for args in ((), ("--scale", "0.5"), ("--size", "32x32"), ("--scale", "1"))}
    for args, proc in runs.items():
        assert proc.returncode == 0, proc.stderr
    miou = {args: json.loads(proc.stdout)["miou"] for args, proc in runs.items()}
    assert miou[()] == miou[("--scale", "0.5")] == miou[("--size", "32x32")] == pytest.approx(expected, abs=1e-12)
    assert json.loads(runs[()].stdout)["scale"] == 0.5  # the run's eval.scale by default
    assert miou[("--scale", "1")] == pytest.approx(
        evaluate(model, view, 11, torch.device("cpu"))["student"]["miou"], abs=1e-12)
    assert_one_line_error(run_cli("eval", str(ckpt), "--scale", "0.5", "--size", "32x32"), "exclude each other")
    assert_one_line_error(run_cli("eval", str(ckpt), "--size", "big"), "expected HxW")
