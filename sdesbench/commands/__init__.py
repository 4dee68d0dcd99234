"""CLI commands: each module defines `register(app: typer.Typer)` and is loaded by `sdesbench.cli`
(modules named `_*` hold what the commands share)."""
