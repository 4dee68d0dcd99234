"""Grids of predictions: image | ground truth | each run's prediction (and Ens-T where the run has it,
titled as the oracle it is: it routes pixels by the ground truth).

`write_grid` draws any runs on the first N images of a split (`sdesbench show`); `write_table_grid`
draws a table's Student, Ours and teacher rows (first seed) on the same images (`report --qualitative`).
Class maps are coloured with the dataset's own palette, ignored pixels (255) black (or, on a dataset
whose palette uses black for a class, VOC's boundary colour), with a legend of class names and
colours. The image column is the image as stored (uint8, before normalisation), so it lines up with
the label and the predictions pixel for pixel.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sdesbench import IGNORE_INDEX
from sdesbench.data.base import SegDataset
from sdesbench.engine.predict import TrainedRun, load_run, predict
from sdesbench.errors import CheckpointError, ConfigError
from sdesbench.experiments.plan import PlannedRun, Sweep
from sdesbench.experiments.spec import Spec
from sdesbench.io import write_file
from sdesbench.registry import did_you_mean
from sdesbench.report.tables import ORACLE_PREDICTIONS

IGNORED_BLACK = (0, 0, 0)
IGNORED_FALLBACK = (224, 224, 192)  # VOC's boundary colour, where a class is drawn black
PREDICTION_NAMES = {"ens_t": "Ens-T"}
# a prediction that reads the ground truth (report.tables.ORACLE_PREDICTIONS) says so in its column's title
ORACLE_TITLE = "oracle: GT routing"


def ignored_colour(palette: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    return IGNORED_FALLBACK if tuple(IGNORED_BLACK) in {tuple(c) for c in palette} else IGNORED_BLACK


def colourise(labels: torch.Tensor, palette: list[tuple[int, int, int]]) -> np.ndarray:
    """H x W class map -> H x W x 3 uint8 in the dataset's palette, ignored pixels in `ignored_colour`."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = ignored_colour(palette)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    index = labels.numpy().astype(np.int64)
    index = np.where((index >= 0) & (index < 256), index, IGNORE_INDEX)
    return lut[index]


def run_label(run: TrainedRun) -> str:
    """A short column title for a run given by its folder: method, network and the folder's name."""
    return f"{run.cfg.method.name}\n{run.cfg.model.name}\n{run.folder.name}"


def column_title(label: str, prediction: str) -> str:
    """A grid column's title: the run's label, with the prediction's name after its first line when it is not
    the student's (`Ours (Ens-T)`), and on its own line that an oracle's pixels were routed by the ground truth."""
    if prediction == "student":
        return label
    first, _, rest = label.partition("\n")
    name = PREDICTION_NAMES.get(prediction, prediction)
    oracle = f"\n({ORACLE_TITLE})" if prediction in ORACLE_PREDICTIONS else ""
    return f"{first} ({name}){oracle}" + ("\n" + rest if rest else "")


def write_grid(runs: list[tuple[str, TrainedRun]], images: int, split: str | None, out: Path,
               title: str = "") -> Path:
    """PNG grid of `runs` (label, run) on the first `images` images of `split` of the first run's dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not runs:
        raise ConfigError("no runs to show")
    dataset: SegDataset = runs[0][1].dataset(split)
    for label, run in runs[1:]:
        if run.cfg.data.name != dataset.name:
            raise ConfigError(f"{label} was trained on {run.cfg.data.name}, {runs[0][0]} on {dataset.name}; "
                              "a grid compares runs on the same images")
    indices = list(range(min(images, len(dataset))))
    if not indices:
        raise ConfigError(f"{dataset.name}/{dataset.split} has no images")
    columns: list[tuple[str, list[torch.Tensor]]] = []
    for label, run in runs:
        for name, maps in predict(run, dataset, indices).items():
            columns.append((column_title(label, name), maps))
    samples = [dataset.load(i) for i in indices]
    height, width = samples[0][1].shape
    cell = 2.4
    n_cols = 2 + len(columns)
    legend_rows = -(-(len(dataset.class_names) + 1) // 6)
    legend_in = 0.22 * legend_rows + 0.2
    fig_h = cell * len(indices) * height / width + 0.6 + legend_in
    fig, axes = plt.subplots(len(indices), n_cols, squeeze=False, figsize=(cell * n_cols, fig_h))
    palette = list(dataset.palette)
    for r, (i, (image, label)) in enumerate(zip(indices, samples)):
        panels = [("image", image.permute(1, 2, 0).numpy()), ("ground truth", colourise(label, palette))]
        panels += [(name, colourise(maps[r], palette)) for name, maps in columns]
        for c, (name, picture) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=7)
        axes[r][0].set_ylabel(dataset.sample_id(i).rsplit("/", 1)[-1], fontsize=7)
    handles = [Patch(facecolor=np.asarray(rgb) / 255, edgecolor="0.5", label=n)
               for n, rgb in zip(dataset.class_names, palette)]
    handles.append(Patch(facecolor=np.asarray(ignored_colour(palette)) / 255, edgecolor="0.5", label="ignored"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    fig.suptitle(title or f"{dataset.name} / {dataset.split}: first {len(indices)} images", fontsize=9)
    fig.tight_layout(rect=(0, legend_in / fig_h, 1, 1 - 0.35 / fig_h))
    out = Path(out)
    write_file(out, lambda f: fig.savefig(f, format="png", dpi=110))  # atomic; a full disk is one line
    plt.close(fig)
    return out


def shown_plans(plans: list[PlannedRun], seed: int, rows: Sequence[str] = ()) -> list[PlannedRun]:
    """The runs a grid draws at `seed`, each once: the rows `rows` names (a row's label, as "Ours", or its
    key, as "EfficientNet-B0/Ours"), in the table's order, or by default each group's Student row (its
    reference) and its last row (a table's own method comes last), and the teachers. Rows reporting
    another prediction (Ens-T) are their run's: the grid draws a run's extra predictions beside it."""
    rows_of = [p for p in plans if p.cfg is not None and p.seed == seed and p.is_row]
    if rows:
        known = {p.key for p in rows_of} | {p.row for p in rows_of}
        unknown = [r for r in rows if r not in known]
        if unknown:
            raise ConfigError(f"--rows: no row {unknown[0]!r} in this table{did_you_mean(unknown[0], known)}; "
                              f"its rows: {', '.join(dict.fromkeys(p.row for p in rows_of))}")
        chosen = [p for p in rows_of if p.key in rows or p.row in rows]
    else:
        teaching = {d for p in rows_of for d in p.needs("teacher")}  # the teachers of this seed's rows
        chosen = [p for p in plans if p.cfg is not None and p.is_teacher and str(p.out) in teaching]
        by_group: dict[str, list[PlannedRun]] = {}
        for p in rows_of:
            by_group.setdefault(p.group, []).append(p)
        for runs in by_group.values():
            reference = next((p for p in runs if p.method == "student"), runs[0])
            chosen += [reference] + ([runs[-1]] if runs[-1] is not reference else [])
    picked: dict[str, PlannedRun] = {}
    for p in chosen:
        picked.setdefault(str(p.out), p)
    return list(picked.values())


def write_table_grid(sweep: Sweep, spec: Spec, images: int, rows: Sequence[str] = ()) -> Path:
    """results/<table>-<preset>-qualitative.png: the runs of `rows` (`shown_plans`) on the same images."""
    if spec.is_sweep:
        raise ConfigError(f"{sweep.table} is a sweep of one method; draw chosen runs with `sdesbench show RUN_DIR ...`")
    plans = shown_plans(sweep.plans(spec), sweep.seeds[0], rows)
    groups = {p.group for p in plans if p.is_row}
    runs, missing = [], []
    for p in plans:
        label = f"teacher {p.row}" if p.is_teacher else (p.row if len(groups) == 1 else f"{p.group} / {p.row}")
        try:
            runs.append((label, load_run(p.out, "auto")))
        except CheckpointError:
            missing.append((label, p))
    if missing:  # a grid without some of its columns would show less than the table it illustrates
        recorded = [label for label, p in missing if p.recorded()]
        advice = (f"bring their weights back with `{sweep.command('run', '--restore-weights')}`" if recorded
                  else f"train them with `{sweep.command('run')}`")
        raise CheckpointError(f"{sweep.name}: no checkpoint here for {', '.join(label for label, _ in missing)}; "
                              f"{advice}")
    if not runs:
        raise CheckpointError(f"{sweep.name} has no rows to draw")
    title = f"{spec.title} (preset {sweep.preset}, seed {sweep.seeds[0]})"
    return write_grid(runs, images, None, Path(sweep.results) / f"{sweep.name}-{sweep.preset}-qualitative.png",
                      title)
