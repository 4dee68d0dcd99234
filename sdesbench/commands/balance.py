"""`sdesbench balance`: loss terms and their encoder-gradient norms relative to L_SS, per checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def balance(
        checkpoints: list[Path] = typer.Argument(..., help="Checkpoints written by `sdesbench train` "
                                                 "(keep some along training with train.keep_checkpoints_every)."),
        batches: int = typer.Option(4, min=1, help="Training batches to average over (the run's first N)."),
        sets: list[str] = typer.Option([], "--set", help="Override a config value before rebuilding, e.g. "
                                       "method.dfed_distance=l2 or data.crop=[512,512] (repeatable)."),
        data_root: Optional[Path] = typer.Option(None, help="Dataset folder (default: the run's)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON list, one record per checkpoint."),
    ):
        """Each loss term's value and the L2 norm of its gradient at the student's encoder, and both
        relative to L_SS (`ss`), measured in train mode on fixed training batches."""
        from rich.table import Table

        from sdesbench.console import Console

        from sdesbench.measure.loss_balance import checkpoint_balance

        records = [checkpoint_balance(c, batches, sets, data_root, device) for c in checkpoints]
        if as_json:
            print(json.dumps(records, indent=2))
            return

        def num(v, fmt="{:.4g}"):
            return "-" if v is None else fmt.format(v)

        title = "loss balance at the encoder (mean over batches)" + (f"; --set {' '.join(sets)}" if sets else "")
        table = Table(title=title)
        for col in ("checkpoint", "iter", "term", "value", "value / ss", "|grad| encoder", "grad / ss"):
            table.add_column(col, justify="left" if col in ("checkpoint", "term") else "right")
        for r in records:
            for name, t in r["terms"].items():
                table.add_row(r["checkpoint"], str(r["iteration"]), name, num(t["value"]), num(t["value_ratio"]),
                              num(t["grad_norm"]), num(t["grad_ratio"]))
        Console(terminal_width=200).print(table)
