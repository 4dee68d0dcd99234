"""Issue 28, section 4: evaluation exactly as mmsegmentation does it. The keep-ratio test resize on mmcv's
rounding, computed by hand; test-time augmentation with OpenCV's resizer (mmcv's `imresize`) against an
independent implementation of mmsegmentation's pipeline written out here (load uint8 -> cv2 INTER_LINEAR resize
-> flip -> normalise -> network -> logits bilinear to the original size -> flip back -> softmax -> mean over the
views), for the 1.x rule (ratios of the image) and the 0.x rule (ratios of the configured scale)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdesbench.data.transforms import normalize
from sdesbench.engine.inference import Inference, inference_size, mmcv_rescale_size, mmseg0_view_size, predictions
from sdesbench.models import SegmentationModel

MEAN255 = np.array([123.675, 116.28, 103.53], np.float32)  # mmsegmentation's data_preprocessor (ImageNet x 255)
STD255 = np.array([58.395, 57.12, 57.375], np.float32)


class ConvDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.classifier = nn.Conv2d(4, 3, 1)

    def forward(self, stages):
        return {"logits": self.classifier(stages[-1]), "decoder_feature": stages[-1]}


class ConvModel(SegmentationModel):
    """Three classes from a 3x3 convolution of the image at half resolution: logits depend on the pixels, so a
    resampler's differences show."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.decoder = ConvDecoder()

    def encode(self, x):
        return [torch.tanh(self.stem(x))[:, :, ::2, ::2] * 4]


def test_keep_ratio_sizes_follow_mmcv_rounding_by_hand():
    # 37 x 53 into scale (32, 24): f = min(32 / 53, 24 / 37) = 32/53; 37 * 32/53 = 22.34 -> int(22.84) = 22,
    # 53 * 32/53 = 32 -> int(32.5) = 32
    assert mmcv_rescale_size(37, 53, (32, 24)) == (22, 32) == mmcv_rescale_size(37, 53, (24, 32))
    # a portrait image: 53 x 37, the same factor on the long side
    assert mmcv_rescale_size(53, 37, (32, 24)) == (32, 22)
    # ADE20K-like 512 x 683 into (2048, 512): f = min(2048 / 683, 512 / 512) = 1 -> unchanged
    assert mmcv_rescale_size(512, 683, (2048, 512)) == (512, 683)
    # a small image grows: 10 x 20 into (2048, 512): f = min(2048 / 20, 512 / 10) = 51.2 -> 512 x 1024
    assert mmcv_rescale_size(10, 20, (2048, 512)) == (512, 1024)
    # a very wide one is bounded by the long side: 100 x 1000 into (2048, 512): f = min(2.048, 5.12) -> 205 x 2048
    assert mmcv_rescale_size(100, 1000, (2048, 512)) == (205, 2048)
    assert inference_size(37, 53, size=(32, 24), keep_ratio=True) == (22, 32)
    assert inference_size(37, 53, size=(32, 24)) == (32, 24)  # fixed: the size itself


def test_mmseg0_view_sizes_scale_the_configured_scale_by_hand():
    # keep-ratio scale (2048, 512) at r = 0.75: (1536, 384); a 512 x 683 image: f = min(1536/683, 384/512) = 0.75
    # -> int(384 + .5) x int(512.25 + .5) = 384 x 512
    assert mmseg0_view_size(512, 683, Inference(size=(2048, 512), resize="keep_ratio"), 0.75) == (384, 512)
    # a fixed size [40, 60] at 0.75: int(30) x int(45), whatever the image
    assert mmseg0_view_size(5, 9, Inference(size=(40, 60)), 0.75) == (30, 45)
    # no size: the image's own (int(9 * .5), int(5 * .5)) = (4, 2), f = min(4/9, 2/5) = 0.4 -> int(2.5) x int(4.1)
    assert mmseg0_view_size(5, 9, Inference(), 0.5) == (2, 4)


def image_and_labels(h=37, w=53):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pixels = cv2.GaussianBlur(pixels, (3, 3), 0)  # some structure, still aliasing when downscaled
    labels = torch.from_numpy(rng.integers(0, 3, (h, w))).long()
    return pixels, labels


def test_keep_ratio_scores_at_the_original_size_and_never_resizes_labels():
    pixels, labels = image_and_labels()
    seen = []
    model = ConvModel().eval()
    model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    image = normalize(torch.from_numpy(pixels).permute(2, 0, 1))[None]
    out = predictions(model, image, labels[None], how=Inference(size=(32, 24), resize="keep_ratio"))["student"]
    assert seen == [(22, 32)]  # the network saw the keep-ratio input
    assert out.shape[-2:] == (37, 53)  # scored at the label's (original) size
    assert Inference(size=(32, 24), resize="keep_ratio").image_resizer == "cv2"


def mmseg_reference(model, pixels, sizes, flip=True):
    """mmsegmentation's test-time augmentation written out from its pipeline: every view is the uint8 image
    resized by OpenCV (INTER_LINEAR, mmcv's `imresize`) to its size, mirrored for the flipped view, normalised
    by the data preprocessor ((x - mean) / std on the 0-255 scale), through the network (logits at the view's
    size), resized bilinearly (align_corners=False) to the original size, mirrored back, softmaxed; the
    probabilities are averaged over the views."""
    h, w = pixels.shape[:2]
    total, n = 0, 0
    for vh, vw in sizes:
        resized = pixels if (vh, vw) == (h, w) else cv2.resize(pixels, (vw, vh), interpolation=cv2.INTER_LINEAR)
        for mirrored in ((False, True) if flip else (False,)):
            view = resized[:, ::-1] if mirrored else resized
            x = torch.from_numpy(((view.astype(np.float32) - MEAN255) / STD255).transpose(2, 0, 1).copy())[None]
            logits = model(x)["logits"]
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            if mirrored:
                logits = logits.flip(-1)
            total, n = total + logits.softmax(1), n + 1
    return total / n


@torch.no_grad()
@pytest.mark.parametrize("rule", ["mmseg", "mmseg0"])
def test_tta_with_mmcv_resizer_equals_an_independent_mmseg_pipeline(rule):
    pixels, labels = image_and_labels()
    model = ConvModel().eval()
    image = normalize(torch.from_numpy(pixels).permute(2, 0, 1))[None]
    ratios = (0.5, 0.75, 1.0, 1.25)
    if rule == "mmseg":  # 1.x: Resize(scale_factor=r, keep_ratio=True) of the 37 x 53 image, sizes by hand:
        # target (int(53 r + .5), int(37 r + .5)), one factor f = min(long t / 53, short t / 37), int(x f + .5)
        how = Inference(scales=ratios, flip=True, tta_rule="mmseg")
        sizes = [(19, 27), (28, 40), (37, 53), (46, 66)]
    else:  # 0.x: MultiScaleFlipAug(img_scale=(64, 32), img_ratios) with keep_ratio: scale (int(64 r), int(32 r)),
        # f = min(max / 53, min / 37): r = .5 -> (32, 16): f = min(32/53, 16/37) = 16/37 -> 16 x int(22.92 + .5)
        how = Inference(scales=ratios, flip=True, tta_rule="mmseg0", size=(64, 32), resize="keep_ratio")
        sizes = [(16, 23), (24, 34), (32, 46), (40, 57)]
    ours = predictions(model, image, labels[None], how=how)["student"]
    ref = mmseg_reference(model, pixels, sizes)
    assert ours.shape == ref.shape == (1, 3, 37, 53)
    assert (ours - ref).abs().max() < 1e-5
    # the suite's antialiased resizer is another computation: it must not pass the same check
    anti = predictions(model, image, labels[None], how=Inference(**{**how.__dict__, "resizer": "antialias"}))
    assert (anti["student"] - ref).abs().max() > 1e-3


# --------------------------------------------------------------------------- test-server export

def export_and_read_back(tmp_path, name):
    """Every val image's prediction (a map cycling through all the classes) exported, the PNGs put back as the
    dataset's own label files (COCO-Stuff: category id - 1, the stuffthingmaps' convention), and read again
    through the dataset's label mapping: (exported values, predictions, labels read back)."""
    from test_datasets_cirkd import H, W, make_ade20k, make_coco_stuff, make_pascal_context

    from sdesbench.data.base import build_dataset
    from sdesbench.data.files import PredictionFiles

    root = {"ade20k": make_ade20k, "pascal_context59": make_pascal_context,
            "coco_stuff164k": make_coco_stuff}[name](tmp_path / "data")
    ds = build_dataset(name, root, "val")
    export = tmp_path / "export"
    files = PredictionFiles(ds, export, len(ds))
    preds = [((torch.arange(H * W) + 7 * i) % ds.num_classes).view(H, W) for i in range(len(ds))]
    for i, pred in enumerate(preds):
        files.write(i, pred)
    values = set()
    for i in range(len(ds)):
        png = np.array(Image.open(export / ds.prediction_name(i)))
        values |= set(np.unique(png).tolist())
        label = ds.pairs[i][1]
        if name == "coco_stuff164k":  # the category ids as a stuffthingmap (id - 1) in place of the train-id file
            label.unlink()
            Image.fromarray((png - 1).astype(np.uint8), mode="L").save(label.parent / f"{label.name.split('_')[0]}.png")
        else:
            Image.fromarray(png, mode="L").save(label)
    again = build_dataset(name, root, "val")
    return values, preds, [again.load(i)[1] for i in range(len(again))]


@pytest.mark.parametrize("name, ids", [
    ("ade20k", set(range(1, 151))),  # the release's class ids: train id + 1 (mmseg's reduce_zero_label + 1)
    ("pascal_context59", set(range(1, 60))),  # the converted labels' ids (0 = background)
    ("coco_stuff164k", None),  # COCO category ids: the 171 annotated of 1..182
])
def test_export_writes_the_server_ids_and_reads_back_as_the_predictions(tmp_path, name, ids):
    from sdesbench.data.coco_stuff import UNUSED_IDS

    values, preds, back = export_and_read_back(tmp_path, name)
    if ids is None:  # category id = stuffthingmap id + 1; the 11 never-annotated categories never appear
        ids = {k + 1 for k in range(182)} - {u + 1 for u in UNUSED_IDS}
        assert min(values) == 1 and max(values) == 182 and 12 not in values  # stuffthingmap 11 = category 12
    assert values == ids
    assert all(torch.equal(p, b) for p, b in zip(preds, back))
