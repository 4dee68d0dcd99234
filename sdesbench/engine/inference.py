"""From a batch of images to label-sized predictions: the inference size (eval.scale / eval.size, fixed or mmcv's
keep-ratio fit: eval.resize) and the image resampler (eval.resizer: mmcv's OpenCV INTER_LINEAR or the suite's
antialiased bilinear), whole images
or mmsegmentation's sliding windows (eval.mode), and test-time augmentation over scales and flips
(eval.scales, eval.flip) merged by mmsegmentation's or CIRKD's rule (eval.tta_rule). docs/evaluation.md has
every detail with its source; in short:

- `whole` (the default, the paper's protocol): the model on the (resized) image, its logits resized back
  (bilinear, align_corners=False) to the label's size.
- `slide`: mmsegmentation's `EncoderDecoder.slide_inference` (open-mmlab/mmsegmentation
  mmseg/models/segmentors/encoder_decoder.py, at fb3391cf5782 and 0067e6d886b5 alike): `h_grids =
  max(H - crop_h + stride_h - 1, 0) // stride_h + 1` windows down (the same across), window (i, j) starting at
  (i * stride_h, j * stride_w) and moved back to end at the border, so every window is a full crop unless
  the image side is smaller than the crop (then one window covers that side); each window's logits at the
  window's size are summed into the full map and divided by the number of windows covering each pixel.
- test-time augmentation, views = scales x (unflipped, flipped), flip applied at every scale:
  `mmseg` (mmseg/models/segmentors/seg_tta.py `SegTTAModel.merge_preds` at 9ba8a8ceebb4, with the TTA
  pipeline's `Resize(scale_factor=r, keep_ratio=True)`, mmcv mmcv/transforms/processing.py at 4c88a4739dd4):
  each view's size is mmcv's keep-ratio rescale of the inference size by r (`mmseg_view_size`), its logits are
  resized back to the label's size (align_corners=False), flipped back, turned into softmax probabilities and
  averaged over the views. `mmseg0` (mmseg 0.x `MultiScaleFlipAug`, mmseg/datasets/pipelines/test_time_aug.py
  at 6f43f4d5d3db): the ratios scale the configured test scale instead (`mmseg0_view_size`), merged the same
  way. `cirkd` (winycg/CIRKD eval.py at dab64dbb5e41): each view is the image resized
  with align_corners=True to floor(H * s) x floor(W * s) (`F.interpolate(scale_factor=s)`), the decoder's
  logits (before the model's own upsampling) go straight to the label's size with align_corners=True, are
  flipped back and averaged as logits (CIRKD's 0.5 * (a + flip(b)) per scale, then the mean over scales: the
  same uniform mean over the 2 x S views).

Extra predictions (SDES's Ens-T, `Method.eval_predictions`, which reads label-sized logits and the labels) are
computed per view from that view's own outputs, exactly as in a single whole-image pass (the view's
label-sized logits and its `stages`, with the labels mirrored for a flipped view), then flipped back and
merged by the same rule as the student's. Under `slide` they are computed per window, from the window's
logits and stages and the labels of that window (the labels resized, nearest, to the view's size when the
view is resized), and stitched like the student's.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sdesbench.config import EvalConfig
from sdesbench.data.transforms import MEAN, STD, normalize
from sdesbench.methods.base import Method
from sdesbench.models import SegmentationModel
from sdesbench.models.base import to_size

Window = tuple[int, int, int, int]  # y1, y2, x1, x2


def accumulable(t: torch.Tensor) -> torch.Tensor:
    """`t` in a precision fit to sum views and windows in: float32 under autocast's float16/bfloat16, else as is."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@dataclass(frozen=True)
class Inference:
    """How to predict (the eval section's inference settings, validated by `config.check_eval_views`)."""

    scale: float = 1.0
    size: tuple[int, int] | None = None
    mode: str = "whole"
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] | None = None
    flip: bool = False
    tta_rule: str = "mmseg"
    resize: str = "fixed"  # fixed: `size` is the input's (H, W); keep_ratio: `size` is mmcv's keep-ratio scale
    resizer: str = "auto"

    @classmethod
    def of(cls, ev: EvalConfig) -> "Inference":
        pair = lambda v: (int(v[0]), int(v[1])) if v is not None else None  # noqa: E731
        return cls(ev.scale, pair(ev.size), ev.mode, pair(ev.crop), pair(ev.stride),
                   tuple(ev.scales) if ev.scales is not None else None, ev.flip, ev.tta_rule, ev.resize, ev.resizer)

    @property
    def keep_ratio(self) -> bool:
        return self.resize == "keep_ratio"

    @property
    def image_resizer(self) -> str:
        """The resampler in force: `resizer`, or for `auto` mmcv's (cv2) where mmsegmentation's pipeline resizes
        (a keep-ratio scale, the views of the mmseg / mmseg0 rules) and the suite's antialiased bilinear else."""
        if self.resizer != "auto":
            return self.resizer
        return "cv2" if self.keep_ratio or (self.tta and self.tta_rule in ("mmseg", "mmseg0")) else "antialias"

    @property
    def tta(self) -> bool:
        return self.scales is not None or self.flip

    def views(self) -> list[tuple[float, bool]]:
        """(scale, flipped) of every view, scale-major: each scale unflipped, then flipped."""
        return [(s, f) for s in (self.scales or (1.0,)) for f in ((False, True) if self.flip else (False,))]

    def describe(self) -> str:
        """One line naming what the numbers were computed with (reports, evaluation records)."""
        at = (f"input resized to fit {self.size[0]}x{self.size[1]} keeping its aspect ratio (mmcv's rounding)"
              if self.size and self.keep_ratio else
              f"input resized to {self.size[0]}x{self.size[1]}" if self.size else
              f"input scaled by {self.scale:g}" if self.scale != 1.0 else "at the image's own size")
        if self.image_resizer == "cv2" and not (self.plain and self.size is None and self.scale == 1.0):
            at += " (OpenCV INTER_LINEAR on the uint8 image, as mmcv)"
        mode, views = self.views_text()
        return f"{mode}, {at}, {views}"

    @property
    def plain(self) -> bool:
        """A single whole-image pass (the paper's protocol, possibly resized)."""
        return self.mode == "whole" and not self.tta

    def views_text(self) -> tuple[str, str]:
        """("whole image" or the windows, "single scale" or the views and their merge)."""
        mode = (f"sliding windows {self.crop[0]}x{self.crop[1]}, stride {self.stride[0]}x{self.stride[1]}"
                if self.mode == "slide" else "whole image")
        if not self.tta:
            return mode, "single scale"
        scales = ", ".join(f"{s:g}" for s in (self.scales or (1.0,)))
        merge = "mean of logits" if self.tta_rule == "cirkd" else "mean of softmax probabilities"
        return mode, f"scales {scales}{' + flip' if self.flip else ''} ({self.tta_rule} rule: {merge})"

    def short_label(self) -> str:
        """The column label of an extra evaluation: `MS+flip`, `MS`, `flip`, `slide`, `scale 0.5`, ..."""
        parts = []
        if self.mode == "slide":
            parts.append("slide")
        if self.scales is not None and len(self.scales) > 1:
            parts.append("MS")
        elif self.scales is not None and self.scales[0] != 1.0:
            parts.append(f"x{self.scales[0]:g}")
        if self.flip:
            parts.append("flip")
        if self.tta and self.tta_rule != "mmseg":
            parts[-1] += f", {self.tta_rule}"
        if self.size is not None and self.keep_ratio:
            parts.append(f"fit {self.size[0]}x{self.size[1]}")
        elif self.size is not None:
            parts.append(f"{self.size[0]}x{self.size[1]}")
        elif self.scale != 1.0:
            parts.append(f"scale {self.scale:g}")
        return "+".join(parts) if parts else "single scale"


WHOLE = Inference()


def mmcv_rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """(H, W) of mmcv's keep-ratio rescale of an h x w image to `scale` (`mmcv.rescale_size`, open-mmlab/mmcv
    40906d30563a mmcv/image/geometric.py): one factor f = min(max(scale) / max(h, w), min(scale) / min(h, w)),
    then each side int(x f + 0.5). The order of `scale`'s two numbers does not matter."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * float(f) + 0.5)), max(1, int(w * float(f) + 0.5))


def inference_size(h: int, w: int, scale: float = 1.0, size: Sequence[int] | None = None,
                   keep_ratio: bool = False) -> tuple[int, int]:
    """The input size of single-scale inference: `size` (H, W), or mmcv's keep-ratio rescale to the scale `size`
    (`keep_ratio`), or `scale` times the image's, rounded."""
    if size is not None:
        return mmcv_rescale_size(h, w, size) if keep_ratio else (int(size[0]), int(size[1]))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resample(images: torch.Tensor, size: Sequence[int], resizer: str = "antialias") -> torch.Tensor:
    """Normalised images (B x 3 x H x W) resampled to `size` (H, W); unchanged at their own size.

    antialias: bilinear, align_corners=False and antialiased, like the training crops' rescaling
    (`data.transforms`). cv2: what mmcv's `imresize` does to the image mmsegmentation loads: OpenCV's
    `INTER_LINEAR` on the uint8 pixels (fixed-point weights, the result rounded to uint8, no antialiasing),
    before normalising. The images are taken back to their uint8 values (they were normalised from uint8,
    so rounding recovers them exactly), resized on the CPU and normalised again."""
    h, w = images.shape[-2:]
    size = (int(size[0]), int(size[1]))
    if size == (h, w):
        return images
    if resizer != "cv2":
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    import cv2  # only here: importing OpenCV costs time the other paths need not pay

    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    pixels = ((images.detach().float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    out = []
    for img in pixels:
        hwc = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
        resized = cv2.resize(hwc, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        out.append(normalize(torch.from_numpy(resized).permute(2, 0, 1)))
    return torch.stack(out).to(device=images.device, dtype=images.dtype)


def inference_input(images: torch.Tensor, scale: float = 1.0, size: Sequence[int] | None = None,
                    keep_ratio: bool = False, resizer: str = "antialias") -> torch.Tensor:
    """The evaluation input: `images` resized (`resample`) to `size` (H, W), to fit the scale `size` keeping
    their aspect ratio (`keep_ratio`), or to `scale` times their size; unchanged at scale 1."""
    h, w = images.shape[-2:]
    return resample(images, inference_size(h, w, scale, size, keep_ratio), resizer)


def mmseg_view_size(h: int, w: int, ratio: float) -> tuple[int, int]:
    """(H, W) of mmcv's `Resize(scale_factor=ratio, keep_ratio=True)`: the target (int(w r + 0.5), int(h r + 0.5))
    (`_scale_size`), then `rescale_size` keeps the aspect ratio with one factor f = min(long target / long side,
    short target / short side) and rounds each side the same way, int(x f + 0.5)."""
    tw, th = int(w * float(ratio) + 0.5), int(h * float(ratio) + 0.5)
    return mmcv_rescale_size(h, w, (tw, th))


def mmseg0_view_size(h: int, w: int, how: "Inference", ratio: float) -> tuple[int, int]:
    """(H, W) of an h x w image's view at `ratio` under mmsegmentation 0.x's `MultiScaleFlipAug(img_ratios)`
    (mmseg/datasets/pipelines/test_time_aug.py at 6f43f4d5d3db): the ratio scales the configured test scale, not
    the image, truncating: scale (int(S1 r), int(S2 r)), then `Resize(keep_ratio=True)` fits the image into it
    (eval.resize=keep_ratio, e.g. int(2048 r) x int(512 r)); a fixed eval.size [H, W] gives (int(H r), int(W r))
    (`keep_ratio=False`); without a size the scale is the inference size's own (int(W r), int(H r)), kept
    to its aspect ratio."""
    r = float(ratio)
    if how.size is not None and how.keep_ratio:
        return mmcv_rescale_size(h, w, (int(how.size[0] * r), int(how.size[1] * r)))
    if how.size is not None:
        return max(1, int(how.size[0] * r)), max(1, int(how.size[1] * r))
    bh, bw = inference_size(h, w, how.scale)
    return mmcv_rescale_size(bh, bw, (int(bw * r), int(bh * r)))


def cirkd_view_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """(H, W) of `F.interpolate(x, scale_factor=scale)` as CIRKD's eval.py calls it: floor(side * scale)."""
    return max(1, math.floor(h * scale)), max(1, math.floor(w * scale))


def slide_windows(h: int, w: int, crop: Sequence[int], stride: Sequence[int]) -> list[Window]:
    """mmsegmentation's sliding windows over an h x w input (module docstring), as (y1, y2, x1, x2)."""
    (ch, cw), (sh, sw) = crop, stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    windows = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
            windows.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return windows


def resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Label maps (B x H x W) at `size`, nearest (the ignore index stays what it is)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(labels.dtype)


def view_input(images: torch.Tensor, how: Inference, ratio: float) -> torch.Tensor:
    """The input of the view at scale `ratio`, resized once from the image: mmseg: mmcv's keep-ratio rescale of
    the inference size by r; mmseg0: the configured scale times r (`mmseg0_view_size`); both resampled by
    `how.image_resizer`. cirkd: floor(side * r) of the inference size, bilinear with align_corners=True."""
    h, w = images.shape[-2:]
    base = inference_size(h, w, how.scale, how.size, how.keep_ratio)
    if how.tta_rule == "cirkd" and how.tta:
        target = cirkd_view_size(*base, ratio)
        if target == (h, w):
            return images
        return F.interpolate(images, size=target, mode="bilinear", align_corners=True)
    target = mmseg0_view_size(h, w, how, ratio) if how.tta and how.tta_rule == "mmseg0" else \
        mmseg_view_size(*base, ratio)
    return resample(images, target, how.image_resizer)


def head_logits(model: SegmentationModel, x: torch.Tensor) -> dict[str, Any]:
    """The model's output with `logits` at the decoder's own resolution (CIRKD resizes from there)."""
    stages = model.encode(x)
    dec = model.decoder(stages)
    return {"logits": dec["logits"], "aux": None, "decoder_feature": dec["decoder_feature"], "stages": stages}


def label_sized(model: SegmentationModel, x: torch.Tensor, labels: torch.Tensor, method: Method | None,
                cirkd: bool) -> dict[str, torch.Tensor]:
    """One whole-image pass: the student's logits at the labels' size and the method's extra predictions from
    them (what a single-scale evaluation scores)."""
    if cirkd:
        out = head_logits(model, x)
        logits = F.interpolate(out["logits"], size=labels.shape[-2:], mode="bilinear", align_corners=True)
    else:
        out = model(x)
        logits = to_size(out["logits"], labels.shape[-2:])
    extra = method.eval_predictions({**out, "logits": logits}, labels) if method is not None else {}
    return {"student": logits, **extra}


def slide(model: SegmentationModel, x: torch.Tensor, labels: torch.Tensor, method: Method | None,
          crop: Sequence[int], stride: Sequence[int]) -> dict[str, torch.Tensor]:
    """Sliding-window logits at x's size (student and extra predictions), mmsegmentation's way; `labels` are
    already at x's size (the extra predictions of each window read that window's labels)."""
    h, w = x.shape[-2:]
    sums: dict[str, torch.Tensor] = {}
    count = x.new_zeros((x.shape[0], 1, h, w), dtype=torch.float32)  # small integers: exact
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        part = label_sized(model, x[..., y1:y2, x1:x2], labels[..., y1:y2, x1:x2], method, cirkd=False)
        for name, logits in part.items():  # summed in float32 at least, whatever the autocast precision
            logits = accumulable(logits)
            acc = sums.setdefault(name, logits.new_zeros((*logits.shape[:2], h, w)))
            acc[..., y1:y2, x1:x2] += logits
        count[..., y1:y2, x1:x2] += 1
    return {name: acc / count for name, acc in sums.items()}


def view_predictions(model: SegmentationModel, images: torch.Tensor, labels: torch.Tensor, method: Method | None,
                     how: Inference, ratio: float, flipped: bool) -> dict[str, torch.Tensor]:
    """One view's label-sized logits (student and extra predictions), flipped back when the view is mirrored."""
    x = view_input(images, how, ratio)
    if flipped:
        x, labels = x.flip(-1), labels.flip(-1)
    if how.mode == "slide":
        maps = slide(model, x, resize_labels(labels, x.shape[-2:]), method, how.crop, how.stride)
        out = {name: to_size(m, labels.shape[-2:]) for name, m in maps.items()}
    else:
        out = label_sized(model, x, labels, method, cirkd=how.tta and how.tta_rule == "cirkd")
    return {name: v.flip(-1) for name, v in out.items()} if flipped else out


@torch.no_grad()
def predictions(model: SegmentationModel, images: torch.Tensor, labels: torch.Tensor, method: Method | None = None,
                amp: torch.dtype | None = None, how: Inference = WHOLE) -> dict[str, torch.Tensor]:
    """Label-sized scores (B x C x H x W, argmax = the prediction) of the student ("student") and of every extra
    prediction the method offers (SDES's "ens_t"), for images already on the device; the model must be in eval
    mode. Without test-time augmentation they are the (stitched) logits; with it, the merged views: mean softmax
    probabilities (mmseg and mmseg0 rules) or mean logits (cirkd rule)."""
    with torch.autocast(images.device.type, dtype=amp) if amp else nullcontext():
        if not how.tta:
            return view_predictions(model, images, labels, method, how, 1.0, False)
        merged: dict[str, torch.Tensor] = {}
        views = how.views()
        for ratio, flipped in views:
            for name, logits in view_predictions(model, images, labels, method, how, ratio, flipped).items():
                score = accumulable(logits) if how.tta_rule == "cirkd" else accumulable(logits).softmax(1)
                merged[name] = merged[name] + score if name in merged else score
    return {name: total / len(views) for name, total in merged.items()}
