"""`sdesbench ablate`: one Figure 3 sweep (alpha, beta, gamma or N) of SDES.

Each value is one run of the swept method (`experiments/fig3.yaml`: `sdes` on DeepLabV3-
EfficientNet-B0, CamVid) with that option overridden (`N` sets `n_experts`); the run folders are
the same hash-keyed ones `sdesbench run fig3` uses, so finished values are never redone. Values
beyond the spec's are remembered in `results/fig3-<preset>.sweeps.json` so that
`sdesbench report fig3` plots them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    from sdesbench import cli  # registered from cli's module body, after its shared options exist

    @app.command()
    def ablate(
        param: str = typer.Option(..., "--param", help="alpha | beta | gamma | N"),
        values: Optional[str] = typer.Option(None, "--values",
                                             help="Comma-separated values (default: the spec's, e.g. gamma "
                                                  "0,0.25,0.5,0.75,1)."),
        preset: str = cli.PRESET_OPTION,
        seeds: str = cli.SEEDS_OPTION,
        results: Path = cli.RESULTS_OPTION,
        sets: list[str] = cli.SETS_OPTION,
        dry_run: bool = cli.DRY_RUN_OPTION,
        progress: bool = cli.PROGRESS_OPTION,
    ):
        """Run a Figure 3 sweep of one SDES hyper-parameter (then `sdesbench report fig3` plots it)."""
        from sdesbench.cli import err, print_plan, train_plans
        from sdesbench.errors import SdesbenchError
        from sdesbench.experiments import (expand, load_spec, parse_seeds, parse_sweep_values,
                                           record_sweep_values, sweep_spec)

        spec = load_spec("fig3")
        value_list = parse_sweep_values(spec, param, values)
        seed_list = parse_seeds(seeds)
        plans = expand(sweep_spec(spec, param, value_list), preset, seed_list, results, sets)
        if dry_run:
            print_plan(plans)
            return
        t0 = time.perf_counter()
        failed = train_plans(plans, f"fig3 {param} ({preset})", results, progress)
        record_sweep_values(results, preset, param, value_list)
        done = sum(1 for p in plans if p.cfg is not None and p.done())
        skipped = sorted({p.skipped for p in plans if p.skipped})
        err.print(f"{param} sweep: {done}/{len(plans)} run(s) completed"
                  + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
                  + f" ({time.perf_counter() - t0:.0f} s); plot with `sdesbench report fig3 --preset {preset}`")
        if failed:
            raise SdesbenchError(f"{failed} run(s) of the {param} sweep failed; the report shows them as failed")
