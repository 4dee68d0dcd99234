"""Issue 22 end to end: `sdesbench eval --set` with sliding windows and multi-scale + flip on the tiny dataset,
each equal to its computation written out here; mAcc in every record and as a report column; `eval --record`
and `report --eval-set` side by side; `eval --export` PNGs of Cityscapes label ids that read back, through the
dataset's own label mapping, as the predicted train ids."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from conftest import assert_one_line_error, read_json, run_cli
from test_datasets import write_image, write_label
from sdesbench.data.base import EvalView
from sdesbench.data.cityscapes import EVAL_IDS, ID_LUT, Cityscapes
from sdesbench.data.tiny import TinyScenes
from sdesbench.data.transforms import normalize
from sdesbench.engine.evaluate import evaluate
from sdesbench.engine.restore import restore
from sdesbench.io import load_checkpoint, write_torch

TINY = ["--set", "data.batch_size=2", "--set", "data.crop=32", "--set", "eval.max_images=4", "--no-progress"]


def hand_scores(preds, labels, num_classes):
    """(mIoU over classes with a union, mAcc over classes in the labels) by explicit counting."""
    mat = [[0] * num_classes for _ in range(num_classes)]
    for pred, label in zip(preds, labels):
        for p, t in zip(pred.flatten().tolist(), label.flatten().tolist()):
            if t != 255:
                mat[t][p] += 1
    ious, accs = [], []
    for c in range(num_classes):
        tp, labelled = mat[c][c], sum(mat[c])
        union = labelled + sum(row[c] for row in mat) - tp
        if union:
            ious.append(tp / union)
        if labelled:
            accs.append(tp / labelled)
    return sum(ious) / len(ious), sum(accs) / len(accs)


def vary_predictions(ckpt) -> None:
    """Seeded random classifier weights and no bias in the checkpoint, so that the barely trained network
    predicts several classes (else every evaluation would agree trivially)."""
    state = load_checkpoint(ckpt)
    weight = state["model"]["decoder.classifier.weight"]
    state["model"]["decoder.classifier.weight"] = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
    state["model"]["decoder.classifier.bias"].zero_()
    write_torch(ckpt, state)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-iteration tiny run (`vary_predictions`)."""
    out = tmp_path_factory.mktemp("eval22") / "run"
    proc = run_cli("train", "--iters", "2", "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr
    vary_predictions(out / "checkpoints" / "last.pt")
    return out


def eval_json(ckpt, *args):
    proc = run_cli("eval", str(ckpt), "--json", "--device", "cpu", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@torch.no_grad()
def test_sliding_window_eval_equals_the_windows_averaged_by_hand(tiny_run):
    ckpt = tiny_run / "checkpoints" / "last.pt"
    got = eval_json(ckpt, "--set", "eval.mode=slide", "--set", "eval.crop=[32,32]", "--set", "eval.stride=[16,16]")
    model = restore(ckpt).model
    view = EvalView(TinyScenes(None, "val"))
    starts = (0, 16, 32)  # 64 px, crop 32 every 16: (64 - 32 + 15) // 16 + 1 = 3 windows, none moved
    preds, labels = [], []
    for i in range(len(view)):
        image, label = view[i]
        total, count = torch.zeros(1, 11, 64, 64), torch.zeros(1, 1, 64, 64)
        for y in starts:
            for x in starts:
                total[..., y:y + 32, x:x + 32] += model(image[None, :, y:y + 32, x:x + 32])["logits"]
                count[..., y:y + 32, x:x + 32] += 1
        assert count.min() == 1 and count.max() == 4  # the corners once, the centre four times
        preds.append((total / count).argmax(1)[0])
        labels.append(label)
    assert len(torch.cat(preds).unique()) > 2
    miou, macc = hand_scores(preds, labels, 11)
    assert got["images"] == 30 and "sliding windows 32x32, stride 16x16" in got["inference"]
    assert got["miou"] == pytest.approx(miou, abs=1e-12) and got["macc"] == pytest.approx(macc, abs=1e-12)
    whole = eval_json(ckpt)
    assert whole["miou"] != got["miou"]  # the windows are used, not ignored


@torch.no_grad()
def test_multi_scale_flip_eval_equals_the_views_merged_by_hand(tiny_run):
    ckpt = tiny_run / "checkpoints" / "last.pt"
    # the suite's antialiased resizer (eval.resizer=antialias); mmsegmentation's own, OpenCV's, is checked against
    # an independent implementation of its pipeline in tests/test_mmseg_eval.py
    got = eval_json(ckpt, "--set", "eval.scales=[0.5,1.0,1.5]", "--set", "eval.flip=true",
                    "--set", "eval.resizer=antialias")
    model = restore(ckpt).model
    view = EvalView(TinyScenes(None, "val"))
    preds, labels = [], []
    for i in range(len(view)):
        image, label = view[i]
        probs = torch.zeros(1, 11, 64, 64)
        for side in (32, 64, 96):  # 64 x 0.5, 1, 1.5 (mmcv's rounding of int(64 r + 0.5))
            x = image[None] if side == 64 else F.interpolate(image[None], size=(side, side), mode="bilinear",
                                                             align_corners=False, antialias=True)
            for flip in (False, True):
                logits = model(x.flip(-1) if flip else x)["logits"]
                logits = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False) \
                    if side != 64 else logits
                probs += (logits.flip(-1) if flip else logits).softmax(1)
        preds.append((probs / 6).argmax(1)[0])
        labels.append(label)
    miou, macc = hand_scores(preds, labels, 11)
    assert "scales 0.5, 1, 1.5 + flip (mmseg rule" in got["inference"]
    assert got["miou"] == pytest.approx(miou, abs=1e-12) and got["macc"] == pytest.approx(macc, abs=1e-12)


@torch.no_grad()
def test_keep_ratio_eval_scores_at_the_original_size_and_writes_the_confusion_matrix(tiny_run, tmp_path):
    from sdesbench.report.confusion import read_confusion_csv

    ckpt = tiny_run / "checkpoints" / "last.pt"
    # 64 x 64 images into the scale (40, 24): f = min(40 / 64, 24 / 64) = 0.375 -> 24 x 24 (mmcv's rounding)
    got = eval_json(ckpt, "--set", "eval.resize=keep_ratio", "--set", "eval.size=[40,24]",
                    "--set", "eval.max_images=3", "--confusion", str(tmp_path))
    assert "resized to fit 40x24 keeping its aspect ratio" in got["inference"]
    names, mat = read_confusion_csv(tmp_path / "confusion.csv")
    view = EvalView(TinyScenes(None, "val"), 3)
    model = restore(ckpt).model
    labels = torch.stack([view[i][1] for i in range(3)])
    # rows sum to the per-class label counts at the labels' own 64 x 64 (the labels are never resized)
    counts = torch.bincount(labels[labels != 255].flatten(), minlength=11)
    assert names == list(TinyScenes.class_names) and mat.sum(1).tolist() == counts.tolist()
    # the prediction: OpenCV INTER_LINEAR on the uint8 image to 24 x 24, logits back to 64 x 64
    preds = []
    for i in range(3):
        pixels = TinyScenes(None, "val").load(i)[0].permute(1, 2, 0).numpy()
        small = cv2.resize(pixels, (24, 24), interpolation=cv2.INTER_LINEAR)
        x = normalize(torch.from_numpy(small).permute(2, 0, 1))[None]
        logits = F.interpolate(model(x)["logits"], size=(64, 64), mode="bilinear", align_corners=False)
        preds.append(logits.argmax(1)[0])
    preds = torch.stack(preds)
    valid = labels != 255
    hand = torch.bincount(labels[valid] * 11 + preds[valid], minlength=121).view(11, 11)
    assert mat.tolist() == hand.tolist()
    miou, macc = hand_scores(list(preds), list(labels), 11)
    assert got["miou"] == pytest.approx(miou, abs=1e-12) and got["macc"] == pytest.approx(macc, abs=1e-12)
    assert (tmp_path / "confusion.png").stat().st_size > 0 and "confusion" not in got["extra"].get("ens_t", {})


def test_batched_and_per_image_counts_under_slide_and_tta(tiny_run):
    from sdesbench.engine.inference import Inference

    model = restore(tiny_run / "checkpoints" / "last.pt").model
    view = EvalView(TinyScenes(None, "val"), 4)
    for how in (Inference(mode="slide", crop=(32, 32), stride=(24, 24), flip=True),
                Inference(scales=(0.75, 1.25), flip=True, tta_rule="cirkd")):
        one = evaluate(model, view, 11, torch.device("cpu"), inference=how, per_image=True)["student"]
        batched = evaluate(model, view, 11, torch.device("cpu"), batch_size=3, inference=how, per_image=True)["student"]
        assert one["miou"] == batched["miou"] and one["macc"] == batched["macc"]
        counts = one["image_counts"].sum(0)  # the per-image counts a bootstrap resamples add up to the totals
        tp, fp, fn = counts
        iou = [t / (t + p + n) for t, p, n in zip(tp.tolist(), fp.tolist(), fn.tolist()) if t + p + n]
        assert one["miou"] == pytest.approx(sum(iou) / len(iou), abs=1e-12)


def test_every_new_record_carries_macc_and_the_report_shows_it_beside_ms_flip(tiny_run, tmp_path):
    rec = read_json(tiny_run / "results.json")
    assert rec["metrics"]["macc"] is not None and 0 <= rec["metrics"]["macc"] <= 1
    assert all(e.get("macc") is None or 0 <= e["macc"] <= 1 for e in rec["history"])
    # a table of one run: its record, an MS+flip evaluation recorded beside it, the report's columns
    spec = tmp_path / "one.yaml"
    spec.write_text(yaml.safe_dump({
        "title": "one", "metrics": ["miou"],
        "presets": {"smoke": {"data": {"name": "tiny", "crop": [32, 32], "batch_size": 2},
                              "train": {"iters": 2, "checkpoint_every": 100}, "eval": {"max_images": 4}}},
        "groups": [{"name": "ENet", "model": "enet", "rows": [{"label": "Student", "method": "student", "miou": 50.0}]}],
    }))
    results = tmp_path / "results"
    assert run_cli("run", str(spec), "--results", str(results), "--no-progress").returncode == 0
    (folder,) = (results / "runs" / "tiny" / "enet" / "student").iterdir()
    sets = ["--set", "eval.scales=[0.5,1.0]", "--set", "eval.flip=true"]
    recorded = eval_json(folder / "checkpoints" / "last.pt", "--record", *sets)
    assert recorded["images"] == 4  # what the run's own final evaluation scored (eval.max_images)
    evaluation = read_json(recorded["recorded"])
    assert evaluation["metrics"]["miou"] == recorded["miou"] and evaluation["split"] == "val"
    report = run_cli("report", str(spec), "--results", str(results), "--columns", "miou,pa,macc",
                     "--eval-set", "eval.scales=[0.5,1.0]", "--eval-set", "eval.flip=true")
    assert report.returncode == 0, report.stderr
    csv = (results / "one-smoke.csv").read_text().splitlines()
    header, row = csv[0].split(","), csv[1].split(",")
    cells = dict(zip(header, row))
    run_rec = read_json(folder / "results.json")
    assert cells["mIoU"] == f"{100 * run_rec['metrics']['miou']:.2f}"
    assert cells["mAcc"] == f"{100 * run_rec['metrics']['macc']:.2f}" and "paper mAcc" not in cells
    assert cells["mIoU (MS+flip)"] == f"{100 * recorded['miou']:.2f}"
    assert cells["mAcc (MS+flip)"] == f"{100 * recorded['macc']:.2f}"
    assert "mmseg rule: mean of softmax probabilities" in report.stdout
    assert "over the classes present in the labels or predictions" in report.stdout
    # another TTA setting names another evaluation: not recorded, so the cell says missing and how to make it
    other = run_cli("report", str(spec), "--results", str(results), "--eval-set", "eval.flip=true", "--force")
    assert other.returncode == 0, other.stderr
    assert "mIoU (flip)" in other.stdout and "missing: no flip evaluation" in other.stdout
    assert_one_line_error(run_cli("report", str(spec), "--results", str(results), "--columns", "miou,dice"),
                          "--columns takes")
    assert_one_line_error(run_cli("report", str(spec), "--results", str(results), "--eval-set", "train.iters=3"),
                          "--eval-set takes eval.*")


@pytest.mark.parametrize("sets, needle", [
    (["eval.mode=slide"], "eval.mode=slide needs eval.crop"),
    (["eval.mode=slide", "eval.crop=[32,32]", "eval.stride=[48,48]"], "exceeds eval.crop"),
    (["eval.crop=[32,32]"], "apply to eval.mode=slide"),
    (["eval.scales=[]"], "non-empty list of positive"),
    (["eval.scales=[1.0, 0]"], "non-empty list of positive"),
    (["eval.tta_rule=mmsegmentation"], "must be one of mmseg, mmseg0, cirkd"),
    (["eval.resize=keep_ratio"], "eval.resize=keep_ratio needs eval.size"),
    (["eval.resizer=opencv"], "must be one of auto, antialias, cv2"),
    (["eval.mode=slide", "eval.crop=[32,32]", "eval.stride=[16,16]", "eval.flip=true", "eval.tta_rule=cirkd"],
     "no sliding window"),
])
def test_eval_settings_that_do_not_fit_are_refused(sets, needle):
    from sdesbench.engine.configure import build_config
    from sdesbench.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        build_config({}, sets)


def test_eval_command_errors_are_one_line(tiny_run):
    ckpt = str(tiny_run / "checkpoints" / "last.pt")
    assert_one_line_error(run_cli("eval", ckpt, "--set", "eval.mode=slide"), "eval.mode=slide needs eval.crop")
    assert_one_line_error(run_cli("eval", ckpt, "--set", "model.name=enet"), "eval --set takes eval.*")
    a_file = tiny_run / "results.json"
    assert_one_line_error(run_cli("eval", ckpt, "--confusion", str(a_file)), "not a folder (it is a file)")


def make_cityscapes(root, h=24, w=32):
    """Two train and two val images (lindau, frankfurt) with labelIds covering several evaluated classes."""
    ids = np.zeros((h, w), np.uint8)
    ids[: h // 3] = 7  # road
    ids[h // 3: 2 * h // 3] = 26  # car
    ids[2 * h // 3:, : w // 2] = 21  # vegetation
    ids[2 * h // 3:, w // 2:] = 23  # sky
    for split, names in (("train", ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019"]),
                         ("val", ["lindau/lindau_000000_000019", "frankfurt/frankfurt_000000_000294"])):
        for i, stem in enumerate(names):
            write_image(root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png", seed=i + 3, size=(h, w))
            write_label(root / "gtFine" / split / f"{stem}_gtFine_labelIds.png", np.roll(ids, i, axis=1))


def test_train_ids_map_to_label_ids_and_back():
    train_ids = torch.arange(19).view(1, 19)
    label_ids = Cityscapes.prediction_values(None, train_ids)
    assert label_ids.tolist() == [EVAL_IDS] and label_ids.dtype == torch.uint8
    assert ID_LUT[label_ids.long()].tolist() == train_ids.tolist()


@torch.no_grad()
def test_cityscapes_export_writes_label_ids_that_read_back_as_the_predicted_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    make_cityscapes(root)
    out = tmp_path / "run"
    proc = run_cli("train", "--dataset", "cityscapes", "--data-root", str(root), "--iters", "2", "--out", str(out),
                   "--set", "data.batch_size=2", "--set", "data.crop=16", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    ckpt = out / "checkpoints" / "last.pt"
    vary_predictions(ckpt)
    export = tmp_path / "submission"
    got = eval_json(ckpt, "--export", str(export))
    assert got["images"] == 2
    names = sorted(p.name for p in export.iterdir())
    assert names == ["frankfurt_000000_000294_leftImg8bit.png", "lindau_000000_000019_leftImg8bit.png"]
    # the model's own predictions, computed here
    model = restore(ckpt).model
    ds = Cityscapes(root, "val")
    view = EvalView(ds)
    expected = {ds.pairs[i][0].name: model(view[i][0][None])["logits"].argmax(1)[0] for i in range(len(ds))}
    # the PNGs hold label ids only (the server's values), and put beside the images as their labelIds files
    # they read back through the dataset's mapping as exactly the predicted train ids
    back = tmp_path / "readback"
    shutil.copytree(root / "leftImg8bit", back / "leftImg8bit")
    for name in names:
        values = np.array(Image.open(export / name))
        assert set(np.unique(values).tolist()) <= set(EVAL_IDS)
        city = name.split("_")[0]
        stem = name[: -len("_leftImg8bit.png")]
        (back / "gtFine" / "val" / city).mkdir(parents=True, exist_ok=True)
        shutil.copy(export / name, back / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
    read = Cityscapes(back, "val")
    seen = set()
    for i in range(len(read)):
        _, train_ids = read.load(i)
        assert torch.equal(train_ids, expected[read.pairs[i][0].name])
        seen |= set(train_ids.unique().tolist())
    assert len(seen) > 1  # not a trivial single-class map
