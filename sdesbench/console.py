"""The suite's two text streams: results on stdout (`out`), progress and notes on stderr (`err`).

On a terminal they are rich's consoles as usual: wrapped to the terminal's width, colours, live
progress bars. Anywhere else (a file, a pipe, `| tee`, a Slurm/submitit log, CI, nohup) a line is
never wrapped or cut: rich would lay text out at 80 columns (or at the width of whichever standard
stream is a terminal), breaking a results path mid-word and cutting a table row, and its progress
bars would print nothing until they end. There the progress bars give way to plain lines
(`engine/hooks.py`, `ProgressHook`), and colour codes are left out (rich does that itself).

Whether a stream is a terminal is rich's own test (`Console.is_terminal`, which honours
`FORCE_COLOR` and `TTY_COMPATIBLE`), asked each time, not once at import: the stream a console
writes to is whatever `sys.stdout` / `sys.stderr` is when it prints.
"""
from __future__ import annotations

from rich.console import Console as RichConsole
from rich.console import ConsoleDimensions

# Off a terminal: wider than any line the suite prints (a table row, a path), so nothing wraps; a
# table still takes only its natural width (no table here expands to the console's width).
UNWRAPPED_WIDTH = 10_000


class Console(RichConsole):
    """rich's Console; off a terminal, `UNWRAPPED_WIDTH` wide and soft-wrapping (no line is cut).
    `terminal_width`: the width on a terminal instead of the terminal's own (a wide table that the
    terminal itself wraps rather than rich folding its cells). `COLUMNS` sets no width off a terminal:
    rich reads it for a terminal, and a shell or a CI runner may export it into a job whose output is
    a file."""

    def __init__(self, *args, terminal_width: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.terminal_width = terminal_width

    def _size(self) -> ConsoleDimensions:
        size = RichConsole.size.fget(self)
        if not self.is_terminal:
            return ConsoleDimensions(UNWRAPPED_WIDTH, size.height)
        return ConsoleDimensions(self.terminal_width, size.height) if self.terminal_width else size

    size = property(_size, RichConsole.size.fset)

    def print(self, *objects, **kwargs) -> None:  # noqa: A003 - rich's own name
        if kwargs.get("soft_wrap") is None and not self.is_terminal:
            kwargs["soft_wrap"] = True  # a longer line stays one line rather than being cut
        super().print(*objects, **kwargs)


out = Console()
err = Console(stderr=True)
