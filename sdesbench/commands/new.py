"""`sdesbench new method NAME`: write a plugin method, its test and its smoke table (experiments/scaffold.py)."""
from __future__ import annotations

from pathlib import Path

import typer

from sdesbench.console import out

new_app = typer.Typer(no_args_is_help=True, help="Write a new plugin from the suite's contract.")


@new_app.command("method")
def method(
    name: str = typer.Argument(..., help="The method's name: a Python identifier (its file, module and option prefix)."),
    teacher_student: bool = typer.Option(False, "--teacher-student", help="Distil from a teacher (pixel KD at a "
                                         "temperature); default: teacher-free self-KD."),
    folder: Path = typer.Option(Path("."), "--dir", help="Folder to write NAME.py, test_NAME.py and NAME.yaml in."),
):
    """Write NAME.py (a working plugin method for you to change), test_NAME.py (its loss checked against the
    formula by hand) and NAME.yaml (a table that extends a built-in one with its row), then print the two
    commands that run them."""
    from sdesbench.experiments.scaffold import write_method

    new = write_method(name, teacher_student, folder)
    smoke, test = new.commands()
    for path in (new.plugin, new.test, new.spec):
        out.print(f"wrote {path}")
    out.print(f"run its table:  {smoke}")
    out.print(f"run its test:   {test}")


def register(app: typer.Typer) -> None:
    app.add_typer(new_app, name="new")
