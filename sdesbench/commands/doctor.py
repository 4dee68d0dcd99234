"""`sdesbench doctor`: whether this machine can run the suite, in which precisions, and how fast."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from sdesbench.commands._shared import err, out


def _names(text: Optional[str]) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _print(r: dict[str, Any]) -> None:
    from sdesbench.measure.bench import table_estimate_lines

    env = r["environment"]
    t = Table(title="environment", show_header=False)
    for key in ("device", "python", "torch", "torchvision", "timm", "cuda", "cudnn", "nccl", "bf16", "cpu_count",
                "torch_threads", "results_folder", "free_disk_gb"):
        t.add_row(key, str(env[key]))
    for g in env["gpus"]:
        t.add_row(f"GPU {g['index']}", f"{g['name']}, {g['memory_gb']} GiB, compute {g['capability']}")
    out.print(t)
    t = Table(title="ImageNet weights (offline)")
    for col in ("model", "backbone", "found"):
        t.add_column(col)
    for w in r["weights"]:
        t.add_row(w["model"], w["backbone"], w["where"] if w["found"] else f"[yellow]no[/yellow]: {w['hint']}")
    out.print(t)

    labels = list(dict.fromkeys(c["label"] for c in r["checks"]))
    t = Table(title=f"training steps: every loss term finite and within tolerance of fp32 ({r['device']})")
    t.add_column("method / model")
    for label in labels:
        t.add_column(label)
    rows: dict[str, dict[str, str]] = {}
    for c in r["checks"]:
        cell = "[green]ok[/green]" if c["passed"] else "[red]FAIL[/red]"
        if c["passed"] and c["worst"] is not None:
            cell += f" {c['worst']:.2f}"
        rows.setdefault(f"{c['method']} / {c['model']}", {})[c["label"]] = cell
    for name, cells in rows.items():
        t.add_row(name, *(cells.get(label, "") for label in labels))
    out.print(t)
    out.print("cell: ok and the largest deviation from fp32 as a fraction of the tolerance (<= 1 passes)")
    for key in ("compile", "ddp"):
        out.print(f"{key}: " + ", ".join(f"{k}={v}" for k, v in r[key].items()))
    if r.get("speed"):
        t = Table(title="student training step (paper protocol on CUDA; scaled from a smaller one on CPU)")
        for col in ("model", "precision", "batch", "crop", "step ms", "img/s", "peak MB", "TFLOP/s", "% of peak"):
            t.add_column(col)
        for s in r["speed"]:
            if "note" in s:
                t.add_row(s["model"], s["precision"], str(s["batch"]), str(s["crop"]), s["note"])
                continue
            frac = s["peak_flops_fraction"]
            t.add_row(s["model"], s["precision"], str(s["batch"]), str(s["crop"]), f"{s['step_ms']:.1f}",
                      f"{s['images_per_s']:.2f}", f"{s['peak_memory_mb']:.0f}", f"{s['tflops_per_s']:.3f}",
                      f"{100 * frac:.1f}" if frac else "-")
        out.print(t)
        for line in table_estimate_lines(r.get("tables", [])):
            out.print(line)
    for f in r["failures"]:
        out.print(f"[red]FAIL[/red] {f}")


def register(app: typer.Typer) -> None:
    @app.command()
    def doctor(
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        quick: bool = typer.Option(False, "--quick", help="Fewer steps; no torch.compile, DDP or per-model speed."),
        methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: all)."),
        models: Optional[str] = typer.Option(None, help="Comma-separated models trained with the student (default: "
                                             "all)."),
        results: Path = typer.Option(Path("results"), help="Results folder (its free disk is reported)."),
        weights: list[str] = typer.Option([], "--weights", help="BACKBONE=FILE: ImageNet weights to check for a "
                                          "backbone (e.g. resnet18=/data/resnet18.pth); repeatable."),
        speed: bool = typer.Option(True, "--speed/--no-speed", help="Measure step throughput and table wall times."),
        peak_tflops: Optional[float] = typer.Option(None, help="Device peak TFLOP/s, if not in the built-in table."),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    ):
        """Check this machine: versions, weights, every method in every precision, DDP, speed per table."""
        from sdesbench.errors import ConfigError
        from sdesbench.measure.doctor import CheckFailed, DoctorSettings, run_doctor

        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
        given = {}
        for text in weights:
            if "=" not in text:
                raise ConfigError(f"--weights expects BACKBONE=FILE, got {text!r}")
            key, path = text.split("=", 1)
            given[key.strip()] = path.strip()
        settings = DoctorSettings(device=device, quick=quick, methods=_names(methods), models=_names(models),
                                  results=results, weights=given, speed=speed, peak_tflops=peak_tflops)
        result = run_doctor(settings, log=lambda m: err.print(f"[dim]{m}[/dim]"))
        if as_json:
            print(json.dumps(result, indent=2, default=str))
        else:
            _print(result)
        failures = result["failures"]
        if failures:
            more = f" (and {len(failures) - 1} more check(s) failed)" if len(failures) > 1 else ""
            raise CheckFailed(failures[0] + more)
