"""What several commands share: the table options (`run`, `ablate`, `report`), the dry-run plan table,
and the consoles everything prints to (results on stdout, progress and notes on stderr: `sdesbench.console`,
which never wraps a line when the stream is not a terminal)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from sdesbench.console import Console, err, out

if TYPE_CHECKING:  # the experiments layer imports torch: loaded when a command runs, not at start-up
    from sdesbench.experiments.plan import PlannedRun, Sweep

PRESET_OPTION = typer.Option("smoke", help="paper | mini | smoke")
SEEDS_OPTION = typer.Option("0", help="Comma-separated seeds, e.g. 0,1,2.")
RESULTS_OPTION = typer.Option(Path("results"), help="Results folder, relative to the current folder: tables, "
                              "plots and the run records (runs/<dataset>/<model>/<method>/<hash>/).")
SETS_OPTION = typer.Option([], "--set", help="Override config values for every run: section.key=value.")
DRY_RUN_OPTION = typer.Option(False, "--dry-run", help="List the runs with their protocol; train nothing.")
PROGRESS_OPTION = typer.Option(True, "--progress/--no-progress", help="Show each run's progress: a live bar on a "
                               "terminal, plain lines elsewhere (a log; also with --gpus/--workers).")
GPUS_OPTION = typer.Option(None, "--gpus", help="Train concurrently, one run per GPU (or GPU group), e.g. 0,1,2,3; "
                           "teachers before their students.")
GPUS_PER_RUN_OPTION = typer.Option(1, "--gpus-per-run", min=1, help="GPUs per run with --gpus: >1 trains each run "
                                   "with DDP (torchrun-style process group, its own MASTER_PORT).")
WORKERS_OPTION = typer.Option(None, "--workers", min=1, help="Train this many runs concurrently without --gpus (CPU: "
                              "each with cores/workers threads), each in its own process.")
COMPUTE_MATCHED_OPTION = typer.Option(None, "--compute-matched", metavar="[flops|time]", help="Also train, per "
                                      "group, a Student for as long as the group's KD rows cost (one run per cost "
                                      "class, rounded to 5%; its iterations and LR schedule stretched): by counted "
                                      "training FLOPs (flops, what --compute-matched alone means) or by the rows' "
                                      "measured step time (time: after they ran). The report then shows each row's "
                                      "gain against it too.")


def make_sweep(table: str, preset: str, seeds: str, results: Path, sets: list[str],
               compute_matched: str | None = None) -> Sweep:
    from sdesbench.experiments.plan import Sweep, parse_seeds

    return Sweep(table, preset, parse_seeds(seeds), results, tuple(sets or ()), compute_matched)


def print_plan(plans: list[PlannedRun]) -> None:
    """`--dry-run`: every run with its protocol, its dependencies (each with its kind: teacher, stage,
    compute-matched) and status; trains nothing."""
    t = Table(title="planned runs", show_lines=False)
    cols = ("row", "seed", "model", "method", "dataset", "train/eval split", "iters", "crop", "batch", "lr",
            "temperature", "weights", "N", "expert", "teacher", "teacher seed", "depends on", "status")
    for col in cols:
        t.add_column(col, overflow="fold")
    for p in plans:
        pr = p.protocol
        model = p.cfg.model.name if p.cfg else p.model
        deps = ", ".join(d.describe() for d in p.dependencies)  # kind: run folder below runs/
        if p.matches is not None and not p.dependencies:  # by counted FLOPs: planned up front, waits for nothing
            deps = f"compute-matched: flops ×{p.matches:.2f} (nothing to wait for)"
        status = p.status()
        t.add_row(p.key, str(p.seed), model, "student" if p.is_teacher else p.method, str(pr.get("dataset", "")),
                  f"{pr.get('train_split', '')}/{pr.get('eval_split', '')}", str(pr.get("iters", "")),
                  "x".join(map(str, pr.get("crop", []))), str(pr.get("batch", "")), str(pr.get("lr", "")),
                  pr.get("temperature", ""), pr.get("weights", ""), str(pr.get("N", "")), str(pr.get("expert", "")),
                  str(pr.get("teacher", "")), str(pr.get("teacher_seed", "")), deps, status)
    Console(terminal_width=300).print(t)
    n_run = len({str(p.out) for p in plans if p.cfg is not None})
    out.print(f"{len(plans)} planned rows/teachers, {n_run} distinct runs, "
              f"{sum(1 for p in plans if p.cfg is None)} skipped; nothing was trained (--dry-run)")
