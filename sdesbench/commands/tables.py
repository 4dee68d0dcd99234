"""`sdesbench run` (every row of a paper table), `sdesbench report` (its table and plots) and
`sdesbench list` (what the suite knows)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from sdesbench.commands._shared import (COMPUTE_MATCHED_OPTION, DRY_RUN_OPTION, GPUS_OPTION, GPUS_PER_RUN_OPTION, PRESET_OPTION,
                                       PROGRESS_OPTION, RESULTS_OPTION, SEEDS_OPTION, SETS_OPTION, WORKERS_OPTION, err,
                                       make_sweep, out, print_plan)
from sdesbench.errors import SdesbenchError
from sdesbench.registry import did_you_mean


def print_written(written) -> None:
    """The report's Markdown on stdout; what was kept or written, one line each, on stderr."""
    print(written.md)
    for note in ([written.kept] if written.kept else []) + written.notes:
        err.print(f"note: {note}", soft_wrap=True)  # one line, whatever the terminal's width
    if written.files:
        err.print("wrote " + ", ".join(map(str, written.files)), soft_wrap=True)


AGAINST_OPTION = typer.Option(None, "--against", help="Also compare every row with this row of its group (a label "
                              "such as CIRKD, or group/label): the difference in points, and with two or more seeds "
                              "its Welch 95% interval and p-value (its bootstraps too with --stats).")


CHECKPOINT_OPTION = typer.Option("last", "--checkpoint", help="last (each run's final iteration) | best (its best "
                                  "periodic evaluation, eval.every: selected on the split it is scored on, as "
                                  "CIRKD reports; written to <table>-<preset>-best.md).")


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        table: str = typer.Argument(..., help="A table name (`sdesbench list tables`) or the path of a spec file "
                                    "(my_table.yaml)."),
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
        restore_weights: bool = typer.Option(False, "--restore-weights", help="Also train again every recorded run "
                                             "whose checkpoint is not here (a fresh clone keeps records, not "
                                             "weights), for `show` and `report --qualitative`; each says whether "
                                             "it reproduces its record."),
        against: Optional[str] = AGAINST_OPTION,
        checkpoint: str = CHECKPOINT_OPTION,
        compute_matched: Optional[str] = COMPUTE_MATCHED_OPTION,
    ):
        """Run every row of a paper table (teachers first; finished runs are skipped), then print the table."""
        from sdesbench.experiments.launch import check_launcher, submit_to_slurm
        from sdesbench.experiments.parallel import parse_gpus, plan_slots, train_here
        from sdesbench.report import ReportOptions, build_report
        from sdesbench.report.tables import check_against, check_checkpoint

        report_options = ReportOptions(against=against, checkpoint=checkpoint)
        gpu_ids = parse_gpus(gpus) if gpus is not None else None
        if not dry_run:
            check_launcher(launcher)  # fail before any planning output
            if launcher != "local" and (gpus is not None or workers is not None or gpus_per_run > 1):
                raise SdesbenchError("--gpus, --gpus-per-run and --workers apply to --launcher local")
            plan_slots(gpu_ids, gpus_per_run, workers)  # a bad combination fails before planning too
        sweep = make_sweep(table, preset, seeds, results, sets, compute_matched)
        spec = sweep.spec()
        check_against(spec, against)  # before anything trains
        check_checkpoint(report_options, spec)
        plans = sweep.plans(spec)
        if restore_weights:
            for p in plans:
                p.needs_weights = True
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
        if compute_matched == "time" and not failed and any(p.matches is None and p.skipped and p.dependencies
                                                             for p in plans):
            plans = sweep.plans(spec)  # the KD rows' step times are recorded now: their Students are planned
            failed = train_here(plans, sweep, progress, gpu_ids, gpus_per_run, workers)
        print_written(build_report(sweep, report_options))
        err.print(f"{sweep.title}: {time.perf_counter() - t0:.0f} s")
        if failed:
            raise SdesbenchError(f"{failed} run(s) failed; the table shows them as failed")
        unmeasured = sorted({p.key for p in plans if p.cfg is not None and p.is_row and not p.recorded()})
        if unmeasured:  # e.g. a run another process holds: the table is not complete yet
            raise SdesbenchError(f"{len(unmeasured)} row(s) hold no measured number yet ({', '.join(unmeasured)}); "
                                 f"rerun `{sweep.command('run')}` to finish them")

    @app.command()
    def report(
        tables: list[str] = typer.Argument(None, help="Tables to report, by name or spec path, e.g. table4 fig3 "
                                            "(default: every known table)."),
        preset: str = typer.Option("smoke", help="Preset whose runs to report."),
        seeds: str = SEEDS_OPTION,
        results: Path = RESULTS_OPTION,
        sets: list[str] = typer.Option([], "--set", help="The --set values the runs were made with (part of their "
                                       "hash)."),
        stats: bool = typer.Option(False, "--stats", help="Add bootstraps against each group's Student row from "
                                   "the runs' per-image counts: over seeds and test images (two or more seeds), "
                                   "and over test images only (test-set noise only, never starred; one seed "
                                   "suffices)."),
        formats: list[str] = typer.Option(["md"], "--format", help="md (Markdown + CSV, always) | latex (also "
                                          "<table>-<preset>.tex); repeatable."),
        curves: bool = typer.Option(False, "--curves", help="Also <table>-<preset>-curves.png: training loss and "
                                    "validation mIoU against the iteration for every row."),
        plot: bool = typer.Option(False, "--plot", help="Also <table>-<preset>-forest.png: each row's difference "
                                  "to its Student row with its intervals (those the table has), a line at 0."),
        qualitative: int = typer.Option(0, "--qualitative", min=0, help="Also <table>-<preset>-qualitative.png: "
                                        "the predictions of --rows on the first N images."),
        rows: Optional[str] = typer.Option(None, "--rows", help="Rows the --qualitative grid draws, comma-separated "
                                           "labels or group/label keys (default: each group's Student and last "
                                           "row, and the teachers)."),
        force: bool = typer.Option(False, "--force", help="Replace a table even when it holds more measured cells "
                                   "than the new one."),
        columns: Optional[str] = typer.Option(None, "--columns", help="The metrics to show, comma-separated, of "
                                              "miou, pa, macc (mean per-class accuracy), mdice, mfscore (mean Dice, "
                                              "F-score), e.g. miou,pa,macc (default: the table's own)."),
        eval_sets: list[str] = typer.Option([], "--eval-set", help="Also show each metric of a second evaluation of "
                                            "every run under these eval settings (repeatable eval.key=value), e.g. "
                                            "'eval.scales=[0.5,0.75,1.0,1.25,1.5,1.75]' eval.flip=true: a column "
                                            "`mIoU (MS+flip)`, read from what `sdesbench eval --record` wrote."),
        against: Optional[str] = AGAINST_OPTION,
        checkpoint: str = CHECKPOINT_OPTION,
        compute_matched: Optional[str] = COMPUTE_MATCHED_OPTION,
    ):
        """Write results/<table>-<preset>.md/.csv (fig3: PNG plots too): measured mean ± std beside the paper."""
        from sdesbench.experiments.spec import list_tables, load_spec
        from sdesbench.io import check_writable
        from sdesbench.report import ReportOptions, build_report
        from sdesbench.report.columns import ExtraEvaluation, metric_columns
        from sdesbench.report.tables import check_against, check_checkpoint

        unknown = [f for f in formats if f not in ("md", "latex")]
        if unknown:
            raise SdesbenchError(f"--format must be md or latex, got {unknown[0]!r}")
        names = tables or list_tables()
        wanted = tuple(r.strip() for r in (rows or "").split(",") if r.strip())
        options = ReportOptions(stats=stats, latex="latex" in formats, curves=curves, plot=plot,
                                qualitative=qualitative, force=force,
                                rows=wanted,
                                columns=metric_columns(columns) if columns is not None else (),
                                extra=ExtraEvaluation.parse(eval_sets), against=against, checkpoint=checkpoint)
        for table in names:
            spec = load_spec(table)  # unknown names fail before anything is written, and so do unknown rows
            known = {r.label for g in spec.groups for r in g.rows} | {f"{g.name}/{r.label}" for g in spec.groups
                                                                       for r in g.rows}
            missing = [r for r in wanted if r not in known]
            if missing and not spec.is_sweep:
                raise SdesbenchError(f"--rows: {table} has no row {missing[0]!r}{did_you_mean(missing[0], known)}")
            check_against(spec, against)
            check_checkpoint(options, spec)  # every table's refusal before any is written
        check_writable(results)
        for table in names:
            print_written(build_report(make_sweep(table, preset, seeds, results, sets, compute_matched), options))

    @app.command("list")
    def list_cmd(what: str = typer.Argument("all", help="tables | models | datasets | methods | hooks | all")):
        """List the tables, models, datasets, methods and training hooks the suite knows, and where each comes from
        (built-in or a plugin's file or module); tables with their title and number of rows, hooks with their
        priority and whether every run has them or a run adds them with train.hooks."""
        from sdesbench.data import DATASETS
        from sdesbench.engine.hooks import BUILT_IN_HOOKS, HOOKS, Priority
        from sdesbench.experiments.spec import list_tables, load_spec, table_origin
        from sdesbench.methods import METHODS
        from sdesbench.models import MODELS
        from sdesbench.registry import BUILT_IN

        registries = {"models": MODELS, "datasets": DATASETS, "methods": METHODS, "hooks": HOOKS}
        kinds = ("tables", "models", "datasets", "methods", "hooks")
        if what != "all" and what not in kinds:
            raise SdesbenchError(f"unknown list {what!r}; choose tables, models, datasets, methods, hooks or all")
        def entries(kind: str) -> list[tuple[str, str]]:
            """(name, origin) of each entry; a family's names (`deeplabv3:timm/<name>`) by their pattern."""
            registry = registries[kind]
            return ([(n, registry.origin(n)) for n in registry.names()]
                    + [(pattern, BUILT_IN) for pattern in registry.patterns()])

        if what == "all":
            for kind in kinds:
                shown = list_tables() if kind == "tables" else [
                    n if origin == BUILT_IN else f"{n} (plugin {origin})" for n, origin in entries(kind)]
                out.print(f"[bold]{kind}[/bold]: {', '.join(shown)}", soft_wrap=True)
            return
        if what == "tables":
            rows = []
            for name in list_tables():
                try:
                    spec = load_spec(name)
                    count = (sum(len(s.values) for s in spec.sweeps.values()) if spec.is_sweep
                             else sum(len(g.rows) for g in spec.groups))
                    rows.append((name, table_origin(name), f"{count} rows", spec.title))
                except SdesbenchError as e:  # one table of $SDESBENCH_EXPERIMENTS that does not load: say so, go on
                    rows.append((name, table_origin(name), "-", f"unreadable: {e}"))
        elif what == "hooks":  # by priority: the order they run in
            def priority(name: str) -> str:
                p = HOOKS.get(name).priority
                return f"priority {p}" + (f" ({Priority(p).name})" if p in set(Priority) else "")

            hooks = sorted(entries("hooks"), key=lambda e: HOOKS.get(e[0]).priority)
            rows = [(n, priority(n), "every run" if n in BUILT_IN_HOOKS else "train.hooks",
                     origin if origin == BUILT_IN else f"plugin {origin}") for n, origin in hooks]
        else:
            rows = [(n, origin if origin == BUILT_IN else f"plugin {origin}") for n, origin in entries(what)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)] if rows else []
        for r in rows:
            out.print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1], soft_wrap=True,
                      highlight=False, markup=False)
