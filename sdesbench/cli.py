"""`sdesbench` command line (Typer): the entry point and its error handling.

Commands are modules in `sdesbench/commands/` that define `register(app)` (modules named `_*` are
shared helpers); they parse arguments,
call the layers below and print. Every user error is printed as one line (`error: ...`) with a
non-zero exit status, never a traceback: the suite's own errors (`SdesbenchError`, exit 2, or the
error's own code), and the usage errors of whichever click Typer runs on (an unknown command or
option, a bad value, a missing argument: exit 2, with click's suggestion where it has one).
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import re
import signal
import sys
import threading
import time

try:  # typer, rich and the command modules: the start of every command, in which Ctrl-C must be one line too
    import typer

    import sdesbench.commands as commands
    from sdesbench.errors import SdesbenchError

    # plain help (click's layout): Typer's rich panels label every flag `<bool>` (--help included) and
    # wrap at 80 columns in a log
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      rich_markup_mode=None,
                      help="Reproduce the tables of SDES (AAAI 2023) and the distillation methods it compares.")

    def _print_version(value: bool) -> None:
        if value:
            from sdesbench.version import version_line

            print(version_line())
            raise typer.Exit(0)

    @app.callback()
    def _options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                              help="Print the version (and the git commit in a checkout), then exit."),
                 plugin: list[str] = typer.Option([], "--plugin", metavar="PATH_OR_MODULE",
                                                  help="Load a plugin first: a .py file or a module that registers "
                                                  "methods, models or datasets (repeatable; also "
                                                  "$SDESBENCH_PLUGINS and the entry-point group sdesbench.plugins).")):
        """Reproduce the tables of SDES (AAAI 2023) and the distillation methods it compares."""
        from sdesbench.plugins import load_startup_plugins

        load_startup_plugins(plugin)

    for _mod in pkgutil.iter_modules(commands.__path__):
        if not _mod.name.startswith("_"):  # `_shared` holds what the command modules share
            importlib.import_module(f"{commands.__name__}.{_mod.name}").register(app)
except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)


def click_errors(name: str) -> tuple[type, ...]:
    """The exception class `name` (ClickException, Exit, Abort, NoArgsIsHelpError) of the click Typer
    runs on: recent Typer bundles its own copy (`typer._click`, with Exit/Abort in `typer.exceptions`),
    older Typer uses the `click` package. Every one found is caught."""
    found = []
    for module in ("typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:  # a third-party layout this Typer does not have
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def one_line(e: Exception) -> str:
    """The user-facing line of an error. A DataLoader worker re-raises its exception with the worker's
    whole traceback as the message: keep only the original error's own message (the last line)."""
    text = str(e).strip()
    if "\n" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1])
    return text


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class SigintSeen:
    """SIGINT handler that notes the signal, then raises KeyboardInterrupt as Python's own does. Typer
    (0.18 to 0.29 at least) turns Ctrl-C into exit status 130, returned without a word when not
    standalone; the note lets `main` say why. (The Trainer installs its own handler while it trains,
    and restores this one.)

    Not inside an import: a KeyboardInterrupt raised while torch or numpy is half imported leaves them
    broken ("cannot load module more than once") or aborts the interpreter (SIGABRT), and the
    commands import torch when they start. There the signal is delivered again once the import is over."""

    def __init__(self) -> None:
        self.seen = False
        self.deferred = False

    def __call__(self, signum, frame) -> None:
        self.seen = True
        if importing(frame):
            if not self.deferred:
                self.deferred = True
                threading.Thread(target=self._deliver_after_import, args=(signum,), daemon=True).start()
            return
        signal.default_int_handler(signum, frame)

    def _deliver_after_import(self, signum: int) -> None:
        main_thread = threading.main_thread().ident
        while importing(sys._current_frames().get(main_thread)):
            time.sleep(0.02)
        self.deferred = False
        os.kill(os.getpid(), signum)


def importing(frame) -> bool:
    """Whether `frame` or one of its callers is the import machinery."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


# options whose value may be left out, with the value that then stands for it (the click Typer runs on has no
# optional option values: `--compute-matched` alone means `--compute-matched flops`)
OPTIONAL_VALUES = {"--compute-matched": "flops"}


def with_optional_values(args: list[str]) -> list[str]:
    """`args` with each `OPTIONAL_VALUES` option given without its value (last, or before another option) followed
    by its default value."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in OPTIONAL_VALUES and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(OPTIONAL_VALUES[arg])
    return out


def main() -> None:
    exit_types, abort_types = click_errors("Exit"), click_errors("Abort")
    usage_types, no_args_types = click_errors("ClickException"), click_errors("NoArgsIsHelpError")
    command = typer.main.get_command(app)
    sigint = SigintSeen()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, sigint)
    try:
        rv = command.main(args=with_optional_values(sys.argv[1:]), standalone_mode=False, prog_name="sdesbench")
    except exit_types as e:
        if sigint.seen or isinstance(e.__cause__, KeyboardInterrupt):  # Typer turns Ctrl-C into Exit(130)
            _fail("interrupted", 130)
        sys.exit(e.exit_code)
    except abort_types:
        _fail("interrupted", 130)
    except no_args_types as e:  # `sdesbench` or `sdesbench data` alone: the help, as usual
        e.show()
        sys.exit(0)
    except usage_types as e:
        _fail(" ".join(e.format_message().split()), e.exit_code)
    except SdesbenchError as e:
        _fail(one_line(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    if sigint.seen:  # Typer caught the KeyboardInterrupt and returned 130
        _fail("interrupted", 130)
    sys.exit(rv if isinstance(rv, int) else 0)
