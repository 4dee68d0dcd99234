"""`sdesbench bench`: time and memory of every method's training step, evaluation and data loading."""
from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        model: str = typer.Option("deeplabv3_resnet18", help="Student (and random teacher) architecture."),
        methods: Optional[str] = typer.Option(None, help="Comma-separated methods, or `all` for every registered "
                                              "one (default: a representative handful: student, kl, at, cwd, cirkd, "
                                              "sdes; student is always in)."),
        batch: Optional[int] = typer.Option(None, min=1, help="Batch size (default: 8 on CUDA, 4 on CPU)."),
        crop: Optional[int] = typer.Option(None, min=8, help="Square crop (default: 512 on CUDA, 128 on CPU)."),
        rounds: int = typer.Option(6, min=1, help="Interleaved timing rounds (student and method blocks alternate)."),
        steps: int = typer.Option(2, min=1, help="Steps per timed block."),
        warmup: int = typer.Option(2, min=0, help="Untimed steps per method first."),
        clock: Optional[str] = typer.Option(None, help="process (CPU time, the CPU default) | wall (the CUDA default)."),
        dataset: str = typer.Option("tiny", help="Dataset for the input batch, evaluation and loader."),
        data_root: Optional[str] = typer.Option(None, help="Dataset folder."),
        workers: int = typer.Option(0, min=0, help="Loader workers to benchmark (training crops and evaluation)."),
        eval_images: int = typer.Option(10, min=1, help="Images for the evaluation benchmark."),
        eval_batch: int = typer.Option(1, min=1, help="Evaluation batch (images of equal size are batched)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
        amp: str = typer.Option("auto", help="auto | off | bf16 | fp16 (CUDA only)."),
        peak_tflops: Optional[float] = typer.Option(None, help="Device peak TFLOP/s, if not in the built-in table."),
        tables: bool = typer.Option(True, "--tables/--no-tables", help="Estimate each paper table's wall time."),
        option: list[str] = typer.Option([], "--option", help="Method option METHOD.KEY=VALUE, e.g. sdes.n_experts=2 "
                                          "(repeatable; default: each method's defaults)."),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    ):
        """Benchmark (not a test): step time and peak memory per method relative to student, and more."""
        from sdesbench.config import parse_override
        from sdesbench.console import err
        from sdesbench.errors import ConfigError
        from sdesbench.measure.bench import BenchSettings, format_report, run_bench

        if amp not in ("auto", "off", "bf16", "fp16"):
            raise ConfigError(f"--amp must be auto, off, bf16 or fp16, got {amp!r}")
        if clock not in (None, "process", "wall"):
            raise ConfigError(f"--clock must be process or wall, got {clock!r}")

        options: dict = {}
        for text in option:
            parts, value = parse_override(text)
            if len(parts) != 2:
                raise ConfigError(f"--option expects METHOD.KEY=VALUE, got {text!r}")
            options.setdefault(parts[0], {})[parts[1]] = value
        settings = BenchSettings(model=model, batch=batch, crop=crop, rounds=rounds, steps=steps, warmup=warmup,
                                 clock=clock,
                                 methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
                                 dataset=dataset, data_root=data_root, workers=workers, eval_images=eval_images,
                                 eval_batch=eval_batch,
                                 device=device, amp=amp, peak_tflops=peak_tflops, tables=tables, options=options)
        result = run_bench(settings, log=lambda m: err.print(f"[dim]{m}[/dim]"))
        print(json.dumps(result, indent=2) if as_json else format_report(result))
