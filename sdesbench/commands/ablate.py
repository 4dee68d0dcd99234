"""`sdesbench ablate`: one Figure 3 sweep (alpha, beta, gamma or N) of SDES.

Each value is one run of the swept method (`sdesbench/specs/fig3.yaml`, or the sweep spec `--table` names: `sdes` on DeepLabV3-
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

from sdesbench.commands._shared import (DRY_RUN_OPTION, GPUS_OPTION, GPUS_PER_RUN_OPTION, PRESET_OPTION,
                                       PROGRESS_OPTION, RESULTS_OPTION, SEEDS_OPTION, SETS_OPTION, WORKERS_OPTION, err,
                                       make_sweep, print_plan)
from sdesbench.errors import SdesbenchError


def register(app: typer.Typer) -> None:
    @app.command()
    def ablate(
        param: str = typer.Option(..., "--param", help="alpha | beta | gamma | N"),
        values: Optional[str] = typer.Option(None, "--values", help="Comma-separated values (default: the spec's, "
                                             "e.g. gamma 0,0.25,0.5,0.75,1)."),
        preset: str = PRESET_OPTION,
        seeds: str = SEEDS_OPTION,
        results: Path = RESULTS_OPTION,
        sets: list[str] = SETS_OPTION,
        dry_run: bool = DRY_RUN_OPTION,
        progress: bool = PROGRESS_OPTION,
        gpus: Optional[str] = GPUS_OPTION,
        gpus_per_run: int = GPUS_PER_RUN_OPTION,
        workers: Optional[int] = WORKERS_OPTION,
        table: str = typer.Option("fig3", "--table", help="The sweep spec: a name (`sdesbench list tables`) or "
                                  "the path of a spec file with `sweeps:`."),
    ):
        """Run a Figure 3 sweep of one SDES hyper-parameter (then `sdesbench report fig3` plots it)."""
        from sdesbench.experiments.parallel import parse_gpus, plan_slots, train_here
        from sdesbench.experiments.sweeps import parse_sweep_values, record_sweep_values, sweep_spec

        gpu_ids = parse_gpus(gpus) if gpus is not None else None
        plan_slots(gpu_ids, gpus_per_run, workers)  # a bad combination fails before anything runs
        sweep = make_sweep(table, preset, seeds, results, sets)
        spec = sweep.spec()
        if not spec.is_sweep:
            raise SdesbenchError(f"{table} is a table, not a sweep spec (it has no `sweeps:`); run it with "
                                 f"`sdesbench run {table}`")
        value_list = parse_sweep_values(spec, param, values)
        plans = sweep.plans(sweep_spec(spec, param, value_list))
        if dry_run:
            print_plan(plans)
            return
        t0 = time.perf_counter()
        failed = train_here(plans, sweep, progress, gpu_ids, gpus_per_run, workers)
        record_sweep_values(results, sweep.name, preset, param, value_list)
        done = sum(1 for p in plans if p.cfg is not None and p.done())
        skipped = sorted({p.skipped for p in plans if p.skipped})
        err.print(f"{param} sweep: {done}/{len(plans)} run(s) completed"
                  + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
                  + f" ({time.perf_counter() - t0:.0f} s); plot with `sdesbench report {table} --preset {preset}`")
        if failed:
            raise SdesbenchError(f"{failed} run(s) of the {param} sweep failed; the report shows them as failed")
