"""`sdesbench run` (every row of a paper table), `sdesbench report` (its table and plots) and
`sdesbench list` (what the suite knows)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from sdesbench.commands._shared import (DRY_RUN_OPTION, GPUS_OPTION, GPUS_PER_RUN_OPTION, PRESET_OPTION,
                                       PROGRESS_OPTION, RESULTS_OPTION, SEEDS_OPTION, SETS_OPTION, WORKERS_OPTION, err,
                                       make_sweep, out, print_plan)
from sdesbench.errors import SdesbenchError


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        table: str = typer.Argument(..., help="Table spec in experiments/ (see `sdesbench list tables`)."),
        preset: str = PRESET_OPTION,
        seeds: str = SEEDS_OPTION,
        results: Path = RESULTS_OPTION,
        sets: list[str] = SETS_OPTION,
        dry_run: bool = DRY_RUN_OPTION,
        progress: bool = PROGRESS_OPTION,
        launcher: str = typer.Option("local", help="local (train here: one run after another, or concurrently with "
                                                   "--gpus/--workers) | slurm (submitit jobs)."),
        slurm_partition: Optional[str] = typer.Option(None, help="Slurm partition (--launcher slurm)."),
        slurm_gpus: int = typer.Option(1, min=0, help="GPUs per job; >1 trains each run with DDP (--launcher slurm)."),
        slurm_time: int = typer.Option(240, min=1, help="Time limit per job in minutes (--launcher slurm)."),
        slurm_sets: list[str] = typer.Option([], "--slurm-set", help="Extra submitit parameter key=value "
                                             "(repeatable)."),
        gpus: Optional[str] = GPUS_OPTION,
        gpus_per_run: int = GPUS_PER_RUN_OPTION,
        workers: Optional[int] = WORKERS_OPTION,
    ):
        """Run every row of a paper table (teachers first; finished runs are skipped), then print the table."""
        from sdesbench.experiments.launch import check_launcher, submit_to_slurm
        from sdesbench.experiments.parallel import parse_gpus, plan_slots, train_here
        from sdesbench.report import write_report

        gpu_ids = parse_gpus(gpus) if gpus is not None else None
        if not dry_run:
            check_launcher(launcher)  # fail before any planning output
            if launcher != "local" and (gpus is not None or workers is not None or gpus_per_run > 1):
                raise SdesbenchError("--gpus, --gpus-per-run and --workers apply to --launcher local")
            plan_slots(gpu_ids, gpus_per_run, workers)  # a bad combination fails before planning too
        sweep = make_sweep(table, preset, seeds, results, sets)
        plans = sweep.plans()
        if dry_run:
            print_plan(plans)
            return
        t0 = time.perf_counter()
        if launcher == "slurm":
            submit_to_slurm(plans, sweep, slurm_partition, slurm_gpus, slurm_time, slurm_sets)
            err.print(f"when the jobs have finished: sdesbench report {table} --preset {preset} --seeds {seeds} "
                      f"--results {results}")
            return
        failed = train_here(plans, sweep, progress, gpu_ids, gpus_per_run, workers)
        md_path, md = write_report(sweep)
        print(md)
        err.print(f"wrote {md_path} and {md_path.with_suffix('.csv')} ({time.perf_counter() - t0:.0f} s)")
        if failed:
            raise SdesbenchError(f"{failed} run(s) failed; the table shows them as failed")

    @app.command()
    def report(
        tables: list[str] = typer.Argument(None, help="Tables to report, e.g. table4 fig3 (default: all)."),
        preset: str = typer.Option("smoke", help="Preset whose runs to report."),
        seeds: str = SEEDS_OPTION,
        results: Path = RESULTS_OPTION,
        sets: list[str] = typer.Option([], "--set", help="The --set values the runs were made with (part of their "
                                       "hash)."),
    ):
        """Write results/<table>-<preset>.md/.csv (fig3: PNG plots too): measured mean ± std beside the paper."""
        from sdesbench.experiments.spec import list_tables, load_spec
        from sdesbench.io import check_writable
        from sdesbench.report import write_report

        names = tables or list_tables()
        for table in names:
            load_spec(table)  # unknown names fail before anything is written
        check_writable(results)
        for table in names:
            md_path, md = write_report(make_sweep(table, preset, seeds, results, sets))
            print(md)
            err.print(f"wrote {md_path} and {md_path.with_suffix('.csv')}")

    @app.command("list")
    def list_cmd(what: str = typer.Argument("all", help="tables | models | datasets | methods | all")):
        """List the tables, models, datasets and methods the suite knows."""
        from sdesbench.data import DATASETS
        from sdesbench.experiments.spec import list_tables
        from sdesbench.methods import METHODS
        from sdesbench.models import MODELS

        kinds = {"tables": list_tables, "models": MODELS.names, "datasets": DATASETS.names, "methods": METHODS.names}
        if what != "all" and what not in kinds:
            raise SdesbenchError(f"unknown list {what!r}; choose tables, models, datasets, methods or all")
        for kind, names in kinds.items():
            if what in ("all", kind):
                if what == "all":
                    out.print(f"[bold]{kind}[/bold]: {', '.join(names())}")
                else:
                    for n in names():
                        out.print(n)
