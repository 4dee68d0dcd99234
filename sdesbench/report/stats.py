"""Is a difference real? Three intervals of a row against its group's Student row, each answering its own
question (docs/tables.md, "Significance"):

- `welch`, over seeds: would another training seed give a different difference, on these test images?
  The difference of the mean metric of the two rows, a 95% confidence interval and a two-sided p-value
  from Welch's t-test (unequal variances, Welch-Satterthwaite degrees of freedom). Assumes the seeds are
  independent draws of each row's metric and the mean over seeds roughly normal; the test images are
  held fixed (every seed is scored on the same ones), so it says nothing about another test set.
- `two_level_bootstrap`, over seeds and test images: would another seed and another draw of test
  images give a different difference? Each draw resamples the test images once (shared by both rows
  and by every seed: every run was scored on the same images, so images are crossed with seeds and
  paired between the rows), then each row's seeds independently (the two rows' seeds are independent
  training runs). The interval is the bootstrap standard error with Student-t quantiles (see
  `two_level_bootstrap` for why not the percentiles).
- `paired_bootstrap`, over test images only: would this exact pair of trained models differ on another
  draw of test images? The test images are resampled with replacement (the same draw for both rows),
  the trained weights held fixed: it measures test-set noise only, training noise not included, so its
  interval never carries a star (`Difference.may_star` is False).

All three work from the counts the final evaluation stores (per image, per class: true positives, false
positives, false negatives), so a draw's mIoU is the mIoU of its summed counts, as the evaluation computes it.
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

# What each interval covers, in the forest plot's legend (the table's columns say it in short: tables.COLUMNS).
COVERS = {"welch": "seeds (Welch t; same test images)",
          "two_level": "seeds + test images (two-level bootstrap)",
          "images": "test images only (training noise not included; never starred)"}


@dataclass(frozen=True)
class Difference:
    """Row minus reference: the point estimate, its 95% interval and a two-sided p-value. `may_star`:
    whether an interval that excludes 0 is marked `*` (False for the image-only bootstrap, whose interval
    leaves the training noise out and so cannot say that a method is better)."""

    delta: float
    low: float
    high: float
    p: float | None  # None where the test is undefined (no spread at all)
    may_star: bool = True

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def starred(self) -> bool:
        return self.may_star and self.excludes_zero

    def scaled(self, factor: float) -> Difference:
        """The same difference in other units (metric 0-1 -> points: factor 100)."""
        return Difference(factor * self.delta, factor * self.low, factor * self.high, self.p, self.may_star)

    def cell(self, digits: int = 2) -> str:
        """'+0.62 [-0.10, +1.34]', with ' *' when the interval excludes 0 and may carry a star."""
        mark = " *" if self.starred else ""
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
    df = satterthwaite([(v1, n1 - 1), (v2, n2 - 1)])
    half = sps.t.ppf(0.5 + confidence / 2, df) * se
    p = 2 * sps.t.sf(abs(delta) / se, df)
    return Difference(delta, delta - half, delta + half, float(p))


def satterthwaite(parts: list[tuple[float, int]]) -> float:
    """Degrees of freedom of a sum of independent variance estimates (v_k, with df_k each):
    (sum v_k)^2 / sum(v_k^2 / df_k), Welch-Satterthwaite; parts with v_k = 0 add nothing."""
    used = [(v, df) for v, df in parts if v > 0]
    return sum(v for v, _ in used) ** 2 / sum(v * v / df for v, df in used)


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


def macc_of_counts(counts: np.ndarray) -> np.ndarray:
    """mAcc from summed counts: per class TP / (TP + FN), averaged over the classes present in the labels, as
    `engine.metrics.ConfusionMatrix.compute` does."""
    tp, fn = counts[..., 0, :], counts[..., 2, :]
    labelled = tp + fn
    present = labelled > 0
    acc = np.where(present, tp / np.maximum(labelled, 1), 0.0)
    return acc.sum(-1) / np.maximum(present.sum(-1), 1)


def dice_of_counts(counts: np.ndarray) -> np.ndarray:
    """mDice from summed counts: per class 2 TP / (2 TP + FP + FN), averaged over the classes present in label or
    prediction, as `engine.metrics.ConfusionMatrix.compute` does."""
    tp, fp, fn = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    both = 2 * tp + fp + fn
    present = both > 0
    dice = np.where(present, 2 * tp / np.maximum(both, 1), 0.0)
    return dice.sum(-1) / np.maximum(present.sum(-1), 1)


def fscore_of_counts(counts: np.ndarray) -> np.ndarray:
    """mFscore from summed counts: per class 2 p r / (p + r) (p = TP / (TP + FP), r = TP / (TP + FN)), averaged over
    the classes where it is defined (predicted and labelled, p + r > 0), as `engine.metrics.ConfusionMatrix.compute`
    does: a class predicted or labelled but never right (TP = 0) is left out, not counted 0."""
    tp, fp, fn = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    defined = tp > 0  # TP > 0 makes p and r defined and p + r > 0; TP = 0 leaves p, r or p + r at 0
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / np.maximum(tp + fn, 1)
    f = np.where(defined, 2 * precision * recall / np.where(defined, precision + recall, 1), 0.0)
    return f.sum(-1) / np.maximum(defined.sum(-1), 1)


METRICS_OF_COUNTS = {"miou": miou_of_counts, "pa": pixel_acc_of_counts, "macc": macc_of_counts,
                     "mdice": dice_of_counts, "mfscore": fscore_of_counts}


def multiplicities(rng: np.random.Generator, n: int, draws: int) -> np.ndarray:
    """draws x n: how often each of n items appears in each resample of n drawn with replacement."""
    picks = rng.integers(0, n, size=(draws, n))
    weights = np.zeros((draws, n), dtype=np.int64)
    np.add.at(weights, (np.arange(draws)[:, None], picks), 1)
    return weights


def resample_weights(n_images: int, draws: int, seed: int) -> np.ndarray:
    """draws x n_images: how often each image appears in each resample (drawn with replacement)."""
    return multiplicities(np.random.default_rng(seed), n_images, draws)


def resampled_scores(runs: list[np.ndarray], weights: np.ndarray, metric: str) -> np.ndarray:
    """draws x runs: each run's metric on each image resample (`weights`: draws x images)."""
    score = METRICS_OF_COUNTS[metric]
    n, draws = weights.shape[1], weights.shape[0]
    return np.stack([score((weights @ a.reshape(n, -1)).reshape(draws, *a.shape[1:])) for a in runs], axis=1)


def check_same_images(row: list[np.ndarray], reference: list[np.ndarray], name: str) -> None:
    if not row or not reference:
        raise ValueError(f"{name} needs runs on both sides")
    if any(a.shape != row[0].shape for a in row + reference):
        raise ValueError(f"{name} needs counts of the same images and classes on both sides")


def paired_bootstrap(row: list[np.ndarray], reference: list[np.ndarray], metric: str = "miou",
                     draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED,
                     confidence: float = CONFIDENCE) -> Difference:
    """Per-image paired bootstrap of metric(row) - metric(reference), in metric units (0-1): test-set
    noise only, for these trained weights (never starred).

    `row[i]` and `reference[i]` are the images x 3 x C counts of seed i of each row, on the same
    images in the same order. The point estimate is the mean over seeds of the difference on all
    images; the interval holds the central `confidence` of the `draws` resampled differences; the
    p-value is two-sided, 2 x the share of draws on the far side of zero, with the +1 correction of
    Monte-Carlo tests (so it is never 0: at least 2 / (draws + 1)).
    """
    if len(row) != len(reference):
        raise ValueError("paired_bootstrap needs the same, non-zero number of runs on both sides")
    check_same_images(row, reference, "paired_bootstrap")
    score = METRICS_OF_COUNTS[metric]
    weights = resample_weights(row[0].shape[0], draws, seed)
    point = statistics.fmean(float(score(a.sum(0)) - score(b.sum(0))) for a, b in zip(row, reference))
    diffs = (resampled_scores(row, weights, metric) - resampled_scores(reference, weights, metric)).mean(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    far = min(int((diffs <= 0).sum()), int((diffs >= 0).sum()))
    p = min(1.0, 2 * (far + 1) / (draws + 1))
    return Difference(point, float(low), float(high), p, may_star=False)


@dataclass(frozen=True)
class TwoLevelDraws:
    """The resampling distribution of a two-level bootstrap: `diffs` (per draw, row minus reference,
    seeds and images resampled) and `image_diffs` (the same image draws with every seed once: the
    test-image part alone)."""

    diffs: np.ndarray
    image_diffs: np.ndarray


def two_level_draws(row: list[np.ndarray], reference: list[np.ndarray], metric: str = "miou",
                    draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED) -> TwoLevelDraws:
    """The draws of `two_level_bootstrap`. One generator, in this order: the image multiplicities
    (draws x images: the same as `paired_bootstrap`'s with the same seed), then the row's seed
    multiplicities (draws x its seeds), then the reference's (draws x its seeds).

    A side's value in draw b: with S[s] its seed s's metric on image draw b, M their mean and R the
    mean of the resampled seeds, M + sqrt(n / (n - 1)) (R - M). The factor makes the seed part of the
    bootstrap variance the unbiased s^2 / n (plain resampling of n values gives (n - 1) / n of it: half,
    with two seeds).
    """
    check_same_images(row, reference, "two_level_bootstrap")
    if len(row) < 2 or len(reference) < 2:
        raise ValueError("two_level_bootstrap needs two or more seeds on both sides")
    rng = np.random.default_rng(seed)
    images = multiplicities(rng, row[0].shape[0], draws)
    sides = []
    for runs in (row, reference):
        scores = resampled_scores(runs, images, metric)
        n = len(runs)
        seeds = multiplicities(rng, n, draws)
        mean = scores.mean(1)
        resampled = (seeds * scores).sum(1) / n
        sides.append((mean + math.sqrt(n / (n - 1)) * (resampled - mean), mean))
    (row_b, row_m), (ref_b, ref_m) = sides
    return TwoLevelDraws(row_b - ref_b, row_m - ref_m)


def two_level_bootstrap(row: list[np.ndarray], reference: list[np.ndarray], metric: str = "miou",
                        draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED,
                        confidence: float = CONFIDENCE) -> Difference | None:
    """Two-level bootstrap of mean(metric(row)) - mean(metric(reference)) over seeds and test images,
    in metric units (0-1); None with fewer than two seeds on a side.

    `row` and `reference` are lists of images x 3 x C counts, one per seed (any number per side), all
    on the same images. The point estimate is the difference of the seed means on all images (Welch's).
    The interval is delta +- t(nu) x SE with SE the standard deviation of the draws (`two_level_draws`)
    and nu the Welch-Satterthwaite degrees of freedom of its parts: s_row^2 / n_row (n_row - 1 df),
    s_ref^2 / n_ref (n_ref - 1 df) and the image part (the variance of the draws with the seeds held,
    images - 1 df); p = 2 P(T_nu > |delta| / SE). Not the percentiles of the draws: with two seeds a
    side those exclude 0 whenever both seeds of one row beat both of the other, one time in three with
    no difference at all (docs/tables.md measures it); resampling a handful of seeds cannot show how far
    apart another handful may land, the t quantile with few degrees of freedom does.
    """
    if len(row) < 2 or len(reference) < 2:
        return None
    score = METRICS_OF_COUNTS[metric]
    got = two_level_draws(row, reference, metric, draws, seed)
    row_all = [float(score(a.sum(0))) for a in row]
    ref_all = [float(score(b.sum(0))) for b in reference]
    delta = statistics.fmean(row_all) - statistics.fmean(ref_all)
    se = float(np.std(got.diffs, ddof=1))
    if se == 0:
        return Difference(delta, delta, delta, None)
    n_images = row[0].shape[0]
    parts = [(statistics.variance(row_all) / len(row), len(row) - 1),
             (statistics.variance(ref_all) / len(reference), len(reference) - 1),
             (float(np.var(got.image_diffs, ddof=1)) if n_images > 1 else 0.0, max(n_images - 1, 1))]
    df = satterthwaite(parts) if any(v > 0 for v, _ in parts) else float(len(row) + len(reference) - 2)
    half = sps.t.ppf(0.5 + confidence / 2, df) * se
    p = 2 * sps.t.sf(abs(delta) / se, df)
    return Difference(delta, delta - half, delta + half, float(p))
