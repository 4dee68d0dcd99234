"""`sdesbench profile`: Params and FLOPs of the benchmark's models against a paper's figures."""
from __future__ import annotations

import json
from typing import Optional

import typer

JSON_KEYS = ("reference", "model", "num_classes", "input_size", "aux", "counter", "params_m", "gflops",
             "cirkd_counter_gflops", "paper_params_m", "paper_gflops", "params_rel_diff", "gflops_rel_diff")


def register(app: typer.Typer) -> None:
    @app.command()
    def profile(
        model: Optional[str] = typer.Option(None, help="One model (default: every row of the reference's table)."),
        input: Optional[str] = typer.Option(None, "--input", help="Input HxW (default: the paper's, e.g. 512x1024)."),
        classes: Optional[int] = typer.Option(None, min=1, help="Number of classes (default: the paper's)."),
        reference: str = typer.Option("sdes", help="Figures to compare with: sdes (SDES Tables 2/3, fvcore, "
                                                   "512x1024) or cirkd (CIRKD Table 1, its own counter, aux "
                                                   "heads of the ResNet models, 1024x2048)."),
        as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    ):
        """Params (M) and fvcore FLOPs (G, batch 1, eval) next to a paper's figures.

        The paper's FLOPs are compared only at the paper's input size and class count, in the
        paper's counting convention. Counting ResNet-50 at 512x1024 on a CPU takes about a minute,
        CIRKD's ResNet-101 teacher at 1024x2048 a few.
        """
        from rich.table import Table

        from sdesbench.console import out

        from sdesbench.measure.profile import REFERENCES, parse_size, profile_rows

        records = profile_rows(model, parse_size(input) if input else None, classes, reference=reference)
        if as_json:
            print(json.dumps([{k: r[k] for k in JSON_KEYS if k in r} for r in records], indent=2))
            return

        def num(v, fmt="{:.2f}"):
            return "-" if v is None else fmt.format(v)

        cirkd = REFERENCES[reference].counter == "cirkd"
        table = Table(title=f"Params and FLOPs against {REFERENCES[reference].source} "
                            "(fvcore: 1 multiply-add = 1 FLOP, batch 1, eval)")
        columns = ["model", "aux", "classes", "input", "Params (M)", "paper", "diff", "GFLOPs"]
        columns += ["GFLOPs (CIRKD's count)", "paper", "diff"] if cirkd else ["paper", "diff"]
        for col in columns:
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in records:
            cells = [r["model"], "yes" if r["aux"] else "no", str(r["num_classes"]), "x".join(map(str, r["input_size"])),
                     num(r["params_m"], "{:.6f}"), num(r["paper_params_m"]), num(r["params_rel_diff"], "{:+.2%}"),
                     num(r["gflops"])]
            if cirkd:
                cells.append(num(r["cirkd_counter_gflops"]))
            cells += [num(r["paper_gflops"]), num(r["gflops_rel_diff"], "{:+.2%}")]
            table.add_row(*cells)
        out.print(table)
