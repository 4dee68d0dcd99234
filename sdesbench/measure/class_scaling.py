"""What a large class count costs: the pieces of evaluation, SDES and the dataset checks whose work
grows with the number of classes, timed at the benchmark dataset's own class count and at 171
(COCO-Stuff-164K, the most the suite loads; ADE20K has 150). A section of `sdesbench bench`.

Each piece is the suite's own function on random inputs of the size a run gives it:

- per evaluation image (a whole 512 x 512 image): the suite's whole evaluation (`engine.evaluate`:
  a random-init model of the bench's architecture, the metric, no loader workers), and inside it the
  logits' bilinear upsampling from 1/8 to the image (in every model's forward), the class map
  (`metrics.predict`), the confusion-matrix update and the per-image counts of the final evaluation;
  per evaluation, the metrics from the matrix;
- per SDES training step (the bench's batch and crop, 4 experts): routing the pixels to the experts'
  logits (`route_to_experts`, Eq. 2 and 4; Ens-T's `ensemble_logits` is the same call at evaluation);
- per SDES run: the "more to less" class groups (`class_groups`, equal chunks and the dynamic
  programme of `split_sizes: natural`, which is quadratic in the classes);
- per label file: the dataset check of one image/label pair (`check.inspect_file_sample`: decoding,
  the 256-bin histogram, the label mapping) and the class pixel counts of one label map
  (`mask_class_counts`, what `class_pixel_counts` sums).

A piece that grows linearly takes about 171/C times as long at 171 classes; the `x` column shows
the measured factor beside it.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from sdesbench import IGNORE_INDEX
from sdesbench.data.base import EvalView, SegDataset, mask_class_counts
from sdesbench.data.check import inspect_file_sample
from sdesbench.data.files import build_lut
from sdesbench.engine.evaluate import evaluate
from sdesbench.engine.metrics import ConfusionMatrix, image_counts, predict
from sdesbench.engine.runtime import Runtime
from sdesbench.methods.sdes import class_groups, route_to_experts
from sdesbench.models import build_model
from sdesbench.models.base import to_size

MANY_CLASSES = 171  # COCO-Stuff-164K
EVAL_HW = (512, 512)  # an ADE20K / COCO-Stuff validation image is about 512 x 512 to 512 x 683
EXPERTS = 4  # SDES's N on Cityscapes


def timed_ms(fn: Callable[[], Any], runtime: Runtime, reps: int) -> float:
    """Median milliseconds of `fn()` over `reps` calls after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        runtime.synchronize()
        t0 = time.perf_counter()
        fn()
        runtime.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


class NoiseImages(SegDataset):
    """Random images and labels of `num_classes` classes, generated per index: a stand-in validation set."""

    name = "noise"
    class_names: list[str] = []
    palette: list[tuple[int, int, int]] = []
    splits = ("val",)
    needs_root = False
    generated = True

    def __init__(self, num_classes: int, n: int, hw: tuple[int, int]):
        super().__init__(None, "val")
        self.num_classes, self.n, self.hw = num_classes, n, hw

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        return (torch.randint(0, 256, (3, *self.hw), generator=g, dtype=torch.uint8),
                torch.randint(0, self.num_classes, self.hw, generator=g))


def write_pair(folder: Path, num_classes: int, hw: tuple[int, int], seed: int = 0) -> tuple[Path, Path]:
    """A random RGB image and a grey label of raw values 0..num_classes (0 ignored, as ADE20K's), as PNGs."""
    rng = np.random.default_rng(seed)
    image, label = folder / "image.png", folder / "label.png"
    Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(image)
    Image.fromarray(rng.integers(0, num_classes + 1, hw, dtype=np.uint8), mode="L").save(label)
    return image, label


def piece_timings(num_classes: int, runtime: Runtime, batch: int, crop: int, reps: int, model: str,
                  eval_hw: tuple[int, int] = EVAL_HW) -> dict[str, float]:
    """Milliseconds of each class-dependent piece at `num_classes` classes (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    dev = runtime.device
    h, w = eval_hw
    torch.manual_seed(0)
    network = build_model(model, num_classes).to(dev).eval()
    images = EvalView(NoiseImages(num_classes, 2, eval_hw))
    small = torch.randn(1, num_classes, h // 8, w // 8, generator=g).to(dev)
    logits = to_size(small, eval_hw)
    target = torch.randint(0, num_classes, (1, h, w), generator=g).to(dev)
    target[:, :8] = IGNORE_INDEX
    pred = predict(logits)
    matrix = ConfusionMatrix(num_classes, dev)
    matrix.update(pred, target)
    counts = torch.randint(1, 10**7, (num_classes,), generator=g)
    groups = class_groups(counts, min(EXPERTS, num_classes))
    student = torch.randn(batch, num_classes, crop, crop, generator=g).to(dev)
    experts = [torch.randn(batch, num_classes, crop, crop, generator=g).to(dev) for _ in groups]
    step_labels = torch.randint(0, num_classes, (batch, crop, crop), generator=g).to(dev)
    lut = build_lut({k: k - 1 for k in range(1, num_classes + 1)})
    known = frozenset(range(num_classes + 1))
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        pair = write_pair(Path(tmp), num_classes, eval_hw)
        checked = SimpleNamespace(pairs=[pair], num_classes=num_classes, label_spec=lambda path: (lut, known))
        cpu_label = target[0].cpu()
        return {
            "eval: whole evaluation, per image": timed_ms(
                lambda: evaluate(network, images, num_classes, dev, amp=runtime.amp), runtime, reps) / len(images),
            "eval: logits upsampled to the image (x8)": timed_ms(lambda: to_size(small, eval_hw), runtime, reps),
            "eval: class map (max over classes)": timed_ms(lambda: predict(logits), runtime, reps),
            "eval: confusion-matrix update": timed_ms(lambda: matrix.update(pred, target), runtime, reps),
            "eval: per-image counts (final evaluation)": timed_ms(lambda: image_counts(pred, target, num_classes),
                                                                  runtime, reps),
            "eval: metrics from the matrix (once)": timed_ms(matrix.compute, runtime, reps),
            "sdes: route pixels to experts (per step)": timed_ms(
                lambda: route_to_experts(student, experts, groups, step_labels), runtime, reps),
            "sdes: class groups, equal (once per run)": timed_ms(lambda: class_groups(counts, len(groups)), runtime,
                                                                 reps),
            "sdes: class groups, natural (once per run)": timed_ms(
                lambda: class_groups(counts, len(groups), sizes="natural"), runtime, reps),
            "data check: one image/label pair": timed_ms(lambda: inspect_file_sample(checked, 0), runtime, reps),
            "class pixel counts: one label": timed_ms(lambda: mask_class_counts(cpu_label, num_classes), runtime,
                                                      reps),
        }


def class_scaling(own_classes: int, runtime: Runtime, batch: int, crop: int, model: str = "deeplabv3_resnet18",
                  reps: int = 3, eval_hw: tuple[int, int] = EVAL_HW) -> dict[str, Any]:
    """{"classes": [own, 171], "image": [H, W], "batch", "crop", "experts", "model", "pieces": [{"piece",
    "ms": [...], "ratio"}]}: each piece at the dataset's class count and at 171, and the measured factor."""
    classes = [own_classes, MANY_CLASSES] if own_classes != MANY_CLASSES else [MANY_CLASSES]
    per_count = [piece_timings(c, runtime, batch, crop, reps, model, eval_hw) for c in classes]
    pieces = [{"piece": name, "ms": [round(t[name], 3) for t in per_count],
               "ratio": round(per_count[-1][name] / per_count[0][name], 2) if per_count[0][name] > 0 else None}
              for name in per_count[0]]
    return {"classes": classes, "image": list(eval_hw), "batch": batch, "crop": crop, "experts": EXPERTS,
            "model": model, "pieces": pieces}


def format_class_scaling(r: dict[str, Any]) -> list[str]:
    """Markdown lines for `sdesbench bench` and docs/performance.md."""
    classes = r["classes"]
    linear = classes[-1] / classes[0]
    lines = ["", f"class count: each piece at {' and '.join(map(str, classes))} classes (evaluation of "
                 f"{r['image'][0]}x{r['image'][1]} images by {r['model']}; SDES at batch {r['batch']}, crop "
                 f"{r['crop']}, {r['experts']} experts); linear growth would be x{linear:.1f}",
             "", "| piece | " + " | ".join(f"ms, {c} classes" for c in classes) + " | x |",
             "|---|" + "---|" * len(classes) + "---|"]
    for p in r["pieces"]:
        ratio = f"{p['ratio']:.2f}" if p["ratio"] is not None else "-"
        lines.append(f"| {p['piece']} | " + " | ".join(f"{ms:.2f}" for ms in p["ms"]) + f" | {ratio} |")
    return lines
