"""`sdesbench profile`: Params and FLOPs of the paper's models against the paper's figures."""
from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def profile(
        model: Optional[str] = typer.Option(None, help="One model (default: every row of the paper's table)."),
        input: Optional[str] = typer.Option(None, "--input", help="Input HxW (default: the paper's, e.g. 512x1024)."),
        classes: Optional[int] = typer.Option(None, min=1, help="Number of classes (default: the paper's)."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    ):
        """Params (M) and fvcore FLOPs (G, batch 1, eval) next to the paper's figures.

        The paper's FLOPs are compared only at the paper's input size and class count.
        Counting ResNet-50 at 512x1024 on a CPU takes about a minute.
        """
        from rich.console import Console
        from rich.table import Table

        from sdesbench.measure.profile import parse_size, profile_rows

        records = profile_rows(model, parse_size(input) if input else None, classes)
        if as_json:
            print(json.dumps([{k: r[k] for k in ("model", "num_classes", "input_size", "params_m", "gflops",
                                                 "paper_params_m", "paper_gflops", "params_rel_diff",
                                                 "gflops_rel_diff")} for r in records], indent=2))
            return

        def num(v, fmt="{:.2f}"):
            return "-" if v is None else fmt.format(v)

        table = Table(title="Params and FLOPs (fvcore: 1 multiply-add = 1 FLOP, batch 1, eval)")
        for col in ("model", "classes", "input", "Params (M)", "paper", "diff", "GFLOPs", "paper", "diff"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in records:
            table.add_row(r["model"], str(r["num_classes"]), "x".join(map(str, r["input_size"])),
                          num(r["params_m"]), num(r["paper_params_m"]), num(r["params_rel_diff"], "{:+.2%}"),
                          num(r["gflops"]), num(r["paper_gflops"]), num(r["gflops_rel_diff"], "{:+.2%}"))
        Console().print(table)
