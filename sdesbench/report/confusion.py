"""The confusion matrix of one evaluation (`sdesbench eval --confusion DIR`): the counts as CSV (rows = label
classes, columns = predicted classes, ignored pixels left out, so a row sums to the pixels labelled with its
class) and a heat map PNG of the row-normalised matrix (each row: where that class's pixels went, i.e. its
recall on the diagonal), readable from a handful of classes to ADE20K's 150."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from sdesbench.errors import StorageError
from sdesbench.io import write_file, write_text

CELL_TEXT_MAX = 30  # classes up to which each cell shows its percentage; beyond, the cells are too small to read


def confusion_csv(matrix: np.ndarray, class_names: Sequence[str]) -> str:
    """The counts as CSV text: a header of the predicted classes, then one row per label class."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["label \\ prediction", *class_names])
    for name, row in zip(class_names, matrix):
        out.writerow([name, *(int(v) for v in row)])
    return buf.getvalue()


def read_confusion_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(class names, counts) of a CSV `confusion_csv` wrote."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0][1:], np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=np.int64)


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (a class never labelled: a row of zeros)."""
    sums = matrix.sum(1, keepdims=True)
    return np.divide(matrix, sums, out=np.zeros(matrix.shape, dtype=np.float64), where=sums > 0)


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str):
    """The heat map: row-normalised percentages on a fixed 0-100 scale, class names on both axes; the figure
    grows with the number of classes (and the names' font shrinks) so that every name stays legible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    share = 100 * row_normalised(matrix)
    side = min(max(6.0, 0.16 * n + 3.0), 30.0)  # inches: 19 classes ~ 6, 150 ~ 27
    font = 9 if n <= CELL_TEXT_MAX else max(5.0, min(8.0, 900 / n))  # 150 classes: 6 pt in rows of 13 pt
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=100, interpolation="nearest")
    ax.set_xticks(range(n), labels=class_names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), labels=class_names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("label class")
    ax.set_title(title, fontsize=10)
    if n <= CELL_TEXT_MAX:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=min(font, 8),
                            color="white" if share[i, j] > 60 else "black")
    else:  # no per-cell text: a faint grid every 10 classes helps follow a row or column
        for k in range(10, n, 10):
            ax.axhline(k - 0.5, color="0.85", linewidth=0.4)
            ax.axvline(k - 0.5, color="0.85", linewidth=0.4)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="% of the label class's pixels")
    fig.tight_layout()
    return fig


def write_confusion(folder: str | Path, matrix: np.ndarray, class_names: Sequence[str], title: str,
                    stem: str = "confusion") -> tuple[Path, Path]:
    """`<folder>/<stem>.csv` (counts) and `<folder>/<stem>.png` (heat map); returns both paths."""
    folder = Path(folder)
    csv_path, png_path = folder / f"{stem}.csv", folder / f"{stem}.png"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot write the confusion matrix into {folder}: {e.strerror or e}") from None
    write_text(csv_path, confusion_csv(matrix, class_names))
    fig = confusion_figure(matrix, class_names, title)
    dpi = 130 if len(class_names) > CELL_TEXT_MAX else 120  # 150 classes: 3900 px, 6 pt names ~11 px tall
    try:
        write_file(png_path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return csv_path, png_path
