"""`sdesbench show`: a grid of the predictions of trained runs on the same images."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sdesbench.commands._shared import err


def register(app: typer.Typer) -> None:
    @app.command()
    def show(
        run_dirs: list[Path] = typer.Argument(..., help="Run folders (each with checkpoints/last.pt)."),
        images: int = typer.Option(4, "--images", min=1, help="How many images (the first N of the split)."),
        split: Optional[str] = typer.Option(None, help="Split to draw (default: the first run's eval split)."),
        out_path: Path = typer.Option(Path("predictions.png"), "--out", help="PNG to write."),
        device: str = typer.Option("cpu", help="auto | cpu | cuda"),
    ):
        """Write a PNG grid: image | ground truth | each run's prediction (and Ens-T where the run has it)."""
        from sdesbench.engine.predict import load_run
        from sdesbench.report.qualitative import run_label, write_grid

        runs = [(run_label(run), run) for run in (load_run(d, device) for d in run_dirs)]
        path = write_grid(runs, images, split, out_path)
        err.print(f"wrote {path}")
