"""`sdesbench` command line (Typer).

Core commands live here; further command groups are modules in `sdesbench/commands/` that
define `register(app)` and are picked up automatically. Every user error is printed as one
line (`error: ...`) with a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import re
import sys
import time
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console

from sdesbench.errors import Interrupted, RunLocked, SdesbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reproduce the tables of SDES (AAAI 2023) and the distillation methods it compares.")
out = Console()
err = Console(stderr=True)


def _build_train_config(config: Optional[Path], model, method, dataset, data_root, iters, seed, out_dir, sets,
                        device):
    from sdesbench.config import build_config, load_yaml

    data = load_yaml(config) if config else {}
    cli_sets = []
    for key, value in (("model.name", model), ("method.name", method), ("data.name", dataset),
                       ("data.root", data_root), ("train.iters", iters), ("train.seed", seed),
                       ("output.dir", out_dir), ("train.device", device)):
        if value is not None:
            cli_sets.append(f"{key}={json.dumps(str(value)) if isinstance(value, (str, Path)) else value}")
    return build_config(data, cli_sets + list(sets or []))


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run configuration."),
    model: Optional[str] = typer.Option(None, help="Model name (see `sdesbench list models`)."),
    method: Optional[str] = typer.Option(None, help="Method name (see `sdesbench list methods`)."),
    dataset: Optional[str] = typer.Option(None, help="Dataset name (see `sdesbench list datasets`)."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset folder (default: $SDESBENCH_DATA/<dataset>)."),
    iters: Optional[int] = typer.Option(None, help="Training iterations."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder for checkpoints and results.json."),
    sets: list[str] = typer.Option([], "--set", help="Override any config value: section.key=value (repeatable)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the output folder's last checkpoint."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
):
    """Train one run and evaluate it; writes OUT/results.json."""
    from sdesbench.engine import distributed as D
    from sdesbench.engine.trainer import train as run_train

    cfg = _build_train_config(config, model, method, dataset, data_root, iters, seed, out_dir, sets, device)
    D.init_from_env()
    main = D.is_main()
    try:
        rec = run_train(cfg, resume=resume, show_progress=progress)
    finally:
        D.cleanup()
    if main:
        m = rec["metrics"]
        extra = "".join(f"  {k}: mIoU {100 * v['miou']:.2f}" for k, v in rec.get("extra_metrics", {}).items())
        out.print(f"{cfg.method.name} / {cfg.model.name} / {cfg.data.name}: mIoU {100 * m['miou']:.2f}  "
                  f"PA {100 * m['pixel_acc']:.2f}{extra}  ({rec['iterations']} iters, {rec['wall_time_s']:.0f} s) "
                  f"-> {Path(cfg.output.dir) / 'results.json'}")


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by `sdesbench train`."),
    data_root: Optional[Path] = typer.Option(None, help="Dataset folder (default: the one it was trained on)."),
    split: Optional[str] = typer.Option(None, help="Split to evaluate (default: the run's eval split)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    scale: Optional[float] = typer.Option(None, help="Resize the input by this factor for inference; logits are "
                                          "resized back and scored at the label's size (default: the run's eval.scale)."),
    size: Optional[str] = typer.Option(None, help="Resize the input to HxW instead (e.g. 180x240)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
):
    """Evaluate a checkpoint on whole images (mIoU, pixel accuracy, per-class IoU), optionally resized."""
    from sdesbench.config import build_config
    from sdesbench.data.base import EvalView
    from sdesbench.engine.io import load_checkpoint
    from sdesbench.engine.trainer import build_dataset, evaluate, pick_device
    from sdesbench.models import build_model

    from sdesbench.errors import ConfigError

    if scale is not None and size is not None:
        raise ConfigError("--scale and --size exclude each other; give one")
    sets = [f"eval.scale={scale}", "eval.size=null"] if scale is not None else []
    if size is not None:
        try:
            h, w = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--size: expected HxW such as 180x240, got {size!r}") from None
        sets += [f"eval.size=[{h}, {w}]", "eval.scale=1.0"]
    state = load_checkpoint(checkpoint)
    cfg = build_config({k: v for k, v in state["config"].items()}, sets)
    if data_root is not None:
        cfg.data.root = str(data_root)
    ds = build_dataset(cfg, split or cfg.data.eval_split)
    model = build_model(cfg.model, state["num_classes"])
    model.load_state_dict(state["model"])
    dev = pick_device(device)
    model.to(dev)
    metrics = evaluate(model, EvalView(ds), state["num_classes"], dev, scale=cfg.eval.scale,
                       size=cfg.eval.size)["student"]
    if as_json:
        out.print_json(data={"checkpoint": str(checkpoint), "iteration": state["iteration"], "scale": cfg.eval.scale,
                             "size": cfg.eval.size, **metrics, "class_names": list(ds.class_names)})
        return
    at = f"size {cfg.eval.size[0]}x{cfg.eval.size[1]}" if cfg.eval.size else f"scale {cfg.eval.scale:g}"
    out.print(f"{checkpoint} (iteration {state['iteration']}, input {at}): mIoU {100 * metrics['miou']:.2f}  "
              f"PA {100 * metrics['pixel_acc']:.2f}")
    for name, iou in zip(ds.class_names, metrics["per_class_iou"]):
        out.print(f"  {name:<14} {'—' if iou is None else f'{100 * iou:6.2f}'}")


@app.command("list")
def list_cmd(what: str = typer.Argument("all", help="tables | models | datasets | methods | all")):
    """List the tables, models, datasets and methods the suite knows."""
    from sdesbench.experiments import list_tables
    from sdesbench.registry import DATASETS, METHODS, MODELS

    kinds = {"tables": list_tables, "models": MODELS.names, "datasets": DATASETS.names, "methods": METHODS.names}
    if what != "all" and what not in kinds:
        raise SdesbenchError(f"unknown list {what!r}; choose tables, models, datasets, methods or all")
    for kind, fn in kinds.items():
        if what in ("all", kind):
            names = fn()
            if what == "all":
                out.print(f"[bold]{kind}[/bold]: {', '.join(names)}")
            else:
                for n in names:
                    out.print(n)


# options shared by `run` and `ablate` (sdesbench/commands/ablate.py)
PRESET_OPTION = typer.Option("smoke", help="paper | mini | smoke")
SEEDS_OPTION = typer.Option("0", help="Comma-separated seeds, e.g. 0,1,2.")
RESULTS_OPTION = typer.Option(Path("results"), help="Results folder.")
SETS_OPTION = typer.Option([], "--set", help="Override config values for every run: section.key=value.")
DRY_RUN_OPTION = typer.Option(False, "--dry-run", help="List the runs with their protocol; train nothing.")
PROGRESS_OPTION = typer.Option(True, "--progress/--no-progress")


@app.command()
def run(
    table: str = typer.Argument(..., help="Table spec in experiments/ (see `sdesbench list tables`)."),
    preset: str = PRESET_OPTION,
    seeds: str = SEEDS_OPTION,
    results: Path = RESULTS_OPTION,
    sets: list[str] = SETS_OPTION,
    dry_run: bool = DRY_RUN_OPTION,
    progress: bool = PROGRESS_OPTION,
    launcher: str = typer.Option("local", help="local (train here, one run after another) | slurm (submitit jobs)."),
    slurm_partition: Optional[str] = typer.Option(None, help="Slurm partition (--launcher slurm)."),
    slurm_gpus: int = typer.Option(1, min=0, help="GPUs per job; >1 trains each run with DDP (--launcher slurm)."),
    slurm_time: int = typer.Option(240, min=1, help="Time limit per job in minutes (--launcher slurm)."),
    slurm_sets: list[str] = typer.Option([], "--slurm-set", help="Extra submitit parameter key=value (repeatable)."),
):
    """Run every row of a paper table (teachers first; finished runs are skipped), then print the table."""
    from sdesbench.experiments import expand, load_spec, parse_seeds
    from sdesbench.report import write_table

    if launcher != "local" and not dry_run:
        from sdesbench.launch import check_launcher

        check_launcher(launcher)  # fail before any planning output
    spec = load_spec(table)
    seed_list = parse_seeds(seeds)
    plans = expand(spec, preset, seed_list, results, sets)
    if dry_run:
        print_plan(plans)
        return
    t0 = time.perf_counter()
    if launcher != "local":
        from sdesbench.launch import submit_launcher

        return submit_launcher(launcher, pending_runs(plans, f"{table} ({preset})", results), results,
                               slurm_partition, slurm_gpus, slurm_time, slurm_sets,
                               f"sdesbench report {table} --preset {preset} --seeds {seeds} --results {results}")
    failed = train_plans(plans, f"{table} ({preset})", results, progress)
    md_path, md = write_table(table, preset, seed_list, results, sets)
    print(md)
    err.print(f"wrote {md_path} and {md_path.with_suffix('.csv')} ({time.perf_counter() - t0:.0f} s)")
    if failed:
        raise SdesbenchError(f"{failed} run(s) failed; the table shows them as failed")


def pending_runs(plans, title: str, results: Path) -> list:
    """List skipped rows, then return the distinct run folders not done yet (teachers first)."""
    from sdesbench.engine.io import check_writable

    check_writable(results)
    first_seed = min((p.seed for p in plans), default=0)
    for p in plans:
        if p.skipped and p.seed == first_seed:
            err.print(f"[yellow]skip[/yellow] {p.key}: {p.skipped}")
        elif p.stand_in and p.seed == first_seed and not p.is_teacher:
            err.print(f"[yellow]note[/yellow] {p.key}: {p.stand_in}")
    unique, seen = [], set()
    for p in plans:
        if p.cfg is not None and str(p.out) not in seen:
            seen.add(str(p.out))
            if not p.done():
                unique.append(p)
    err.print(f"{title}: {len(unique)} run(s) to train, {len(seen) - len(unique)} already done")
    return unique


def train_plans(plans, title: str, results: Path, progress: bool) -> int:
    """Train the planned runs not done yet (each distinct run folder once, teachers first).

    Returns the number of runs that failed or could not start; skipped rows are only listed. A run
    that another process is training (its lock is held) is left to that process. SIGINT/SIGTERM stop
    the sweep after the current run saved its checkpoint; rerunning the command continues.
    """
    import torch

    from sdesbench.engine.trainer import train as run_train
    from sdesbench.experiments import read_record

    unique = pending_runs(plans, title, results)
    failed = 0
    for i, p in enumerate(unique, 1):
        err.print(f"[{i}/{len(unique)}] {p.key} seed {p.seed} -> {p.out}")
        if any((read_record(Path(d)) or {}).get("status") != "completed" for d in p.depends_on):
            err.print(f"[red]skip[/red] {p.key}: its teacher did not finish")
            failed += 1
            continue
        if torch.cuda.is_available():  # peak memory per run, not per process
            torch.cuda.reset_peak_memory_stats()
        try:
            run_train(p.cfg, resume=True, show_progress=progress)
        except Interrupted:
            raise
        except RunLocked as e:
            err.print(f"[yellow]skip[/yellow] {p.key}: {e} (rerun `sdesbench run` when it has finished)")
        except SdesbenchError as e:
            err.print(f"[red]failed[/red] {p.key}: {e}")
            failed += 1
    return failed


def print_plan(plans) -> None:
    """`--dry-run`: every run with its protocol, dependency (teacher) and status; trains nothing."""
    from rich.table import Table

    t = Table(title="planned runs", show_lines=False)
    cols = ("row", "seed", "model", "method", "dataset", "iters", "crop", "batch", "lr", "tau", "N", "expert",
            "teacher", "depends on", "status")
    for col in cols:
        t.add_column(col, overflow="fold")
    for p in plans:
        pr = p.protocol
        model = p.cfg.model.name if p.cfg else p.model
        deps = ", ".join(d.split("/runs/")[-1] for d in p.depends_on)
        if p.cfg is None:
            status = f"skipped: {p.skipped}"
        else:
            status = "done" if p.done() else "to run"
            if p.stand_in:
                status += f" ({p.stand_in})"
        t.add_row(p.key, str(p.seed), model, "student" if p.is_teacher else p.method, str(pr.get("dataset", "")),
                  str(pr.get("iters", "")), "x".join(map(str, pr.get("crop", []))), str(pr.get("batch", "")),
                  str(pr.get("lr", "")), str(pr.get("tau", "")), str(pr.get("N", "")), str(pr.get("expert", "")),
                  str(pr.get("teacher", "")), deps, status)
    Console(width=300).print(t)
    n_run = len({str(p.out) for p in plans if p.cfg is not None})
    out.print(f"{len(plans)} planned rows/teachers, {n_run} distinct runs, "
              f"{sum(1 for p in plans if p.cfg is None)} skipped; nothing was trained (--dry-run)")


@app.command()
def report(
    tables: list[str] = typer.Argument(None, help="Tables to report, e.g. table4 fig3 (default: all)."),
    preset: str = typer.Option("smoke", help="Preset whose runs to report."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    results: Path = typer.Option(Path("results"), help="Results folder."),
    sets: list[str] = typer.Option([], "--set", help="The --set values the runs were made with (part of their hash)."),
):
    """Write results/<table>-<preset>.md/.csv (fig3: PNG plots too): measured mean ± std beside the paper."""
    from sdesbench.engine.io import check_writable
    from sdesbench.experiments import list_tables, load_spec, parse_seeds
    from sdesbench.report import write_table

    seed_list = parse_seeds(seeds)
    names = tables or list_tables()
    for table in names:
        load_spec(table)  # unknown names fail before anything is written
    check_writable(results)
    for table in names:
        md_path, md = write_table(table, preset, seed_list, results, sets)
        print(md)
        err.print(f"wrote {md_path} and {md_path.with_suffix('.csv')}")


def _register_command_modules() -> None:
    import sdesbench.commands as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"sdesbench.commands.{mod.name}")
        module.register(app)


_register_command_modules()


def one_line(e: Exception) -> str:
    """The user-facing line of an error. A DataLoader worker re-raises its exception with the worker's
    whole traceback as the message: keep only the original error's own message (the last line)."""
    text = str(e).strip()
    if "\n" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1])
    return text


def main() -> None:
    command = typer.main.get_command(app)
    try:
        rv = command.main(standalone_mode=False, prog_name="sdesbench")
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except SdesbenchError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
