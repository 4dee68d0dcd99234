"""Is a difference real? Two tests of a row against its group's Student row (docs/tables.md).

- `welch`: over seeds. The difference of the mean metric of the two rows, a 95% confidence interval
  and a two-sided p-value from Welch's t-test (unequal variances, Welch-Satterthwaite degrees of
  freedom). Assumes the seeds are independent draws of each row's metric and that the mean over
  seeds is roughly normal; with 2-5 seeds the interval is wide, as it should be.
- `paired_bootstrap`: over test images. The test images are resampled with replacement (the same
  draw for both rows, hence "paired"), each draw's mIoU is computed from the summed per-image
  true positive / false positive / false negative counts of the final evaluation, and the
  difference's 2.5 and 97.5 percentiles give the interval. Assumes the test images are independent
  draws from the images the result should hold for; it measures how much the result depends on
  which images were tested, not on the training seed (it answers with one seed too). With several
  seeds the difference of each draw is the mean over seeds of the per-seed differences (the same
  images for every seed).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Difference:
    """Row minus reference: the point estimate, its 95% interval and a two-sided p-value."""

    delta: float
    low: float
    high: float
    p: float | None  # None where the test is undefined (no spread at all)

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def cell(self, digits: int = 2) -> str:
        """'+0.62 [-0.10, +1.34]', with ' *' when the interval excludes 0."""
        mark = " *" if self.excludes_zero else ""
        return f"{self.delta:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{mark}"

    def p_cell(self) -> str:
        if self.p is None:
            return "—"
        return "<0.001" if self.p < 0.001 else f"{self.p:.3f}"


def welch(row: list[float], reference: list[float], confidence: float = CONFIDENCE) -> Difference | None:
    """Welch's t-test of mean(row) - mean(reference) over seeds; None with fewer than two values on a side."""
    if len(row) < 2 or len(reference) < 2:
        return None
    n1, n2 = len(row), len(reference)
    delta = statistics.fmean(row) - statistics.fmean(reference)
    v1, v2 = statistics.variance(row) / n1, statistics.variance(reference) / n2
    se = math.sqrt(v1 + v2)
    if se == 0:  # every seed gave the same number on both sides: no interval, no test
        return Difference(delta, delta, delta, None)
    df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    half = sps.t.ppf(0.5 + confidence / 2, df) * se
    p = 2 * sps.t.sf(abs(delta) / se, df)
    return Difference(delta, delta - half, delta + half, float(p))


def miou_of_counts(counts: np.ndarray) -> np.ndarray:
    """mIoU from summed counts (... x 3 x C: TP, FP, FN) over the classes present in label or
    prediction, as `engine.metrics.ConfusionMatrix.compute` does."""
    tp, fp, fn = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    union = tp + fp + fn
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), 0.0)
    return iou.sum(-1) / np.maximum(present.sum(-1), 1)


def pixel_acc_of_counts(counts: np.ndarray) -> np.ndarray:
    """Pixel accuracy from summed counts: TP over labelled pixels (TP + FN)."""
    tp, fn = counts[..., 0, :].sum(-1), counts[..., 2, :].sum(-1)
    return tp / np.maximum(tp + fn, 1)


METRICS_OF_COUNTS = {"miou": miou_of_counts, "pa": pixel_acc_of_counts}


def resample_weights(n_images: int, draws: int, seed: int) -> np.ndarray:
    """draws x n_images: how often each image appears in each resample (drawn with replacement)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_images, size=(draws, n_images))
    weights = np.zeros((draws, n_images), dtype=np.int64)
    np.add.at(weights, (np.arange(draws)[:, None], picks), 1)
    return weights


def paired_bootstrap(row: list[np.ndarray], reference: list[np.ndarray], metric: str = "miou",
                     draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED,
                     confidence: float = CONFIDENCE) -> Difference:
    """Per-image paired bootstrap of metric(row) - metric(reference), in metric units (0-1).

    `row[i]` and `reference[i]` are the images x 3 x C counts of seed i of each row, on the same
    images in the same order. The point estimate is the mean over seeds of the difference on all
    images; the interval holds the central `confidence` of the `draws` resampled differences; the
    p-value is two-sided, 2 x the share of draws on the far side of zero, with the +1 correction of
    Monte-Carlo tests (so it is never 0: at least 2 / (draws + 1)).
    """
    if not row or len(row) != len(reference):
        raise ValueError("paired_bootstrap needs the same, non-zero number of runs on both sides")
    n = row[0].shape[0]
    if any(a.shape != row[0].shape for a in row + reference):
        raise ValueError("paired_bootstrap needs counts of the same images and classes on both sides")
    score = METRICS_OF_COUNTS[metric]
    weights = resample_weights(n, draws, seed)
    point = statistics.fmean(float(score(a.sum(0)) - score(b.sum(0))) for a, b in zip(row, reference))
    diffs = np.zeros(draws)
    for a, b in zip(row, reference):
        flat_a = (weights @ a.reshape(n, -1)).reshape(draws, *a.shape[1:])
        flat_b = (weights @ b.reshape(n, -1)).reshape(draws, *b.shape[1:])
        diffs += score(flat_a) - score(flat_b)
    diffs /= len(row)
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    far = min(int((diffs <= 0).sum()), int((diffs >= 0).sum()))
    p = min(1.0, 2 * (far + 1) / (draws + 1))
    return Difference(point, float(low), float(high), p)
