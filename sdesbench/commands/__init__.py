"""Extra CLI command groups: each module defines `register(app: typer.Typer)` and is loaded by `sdesbench.cli`."""
