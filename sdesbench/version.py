"""The suite's version and, when it runs from a git checkout of itself, the commit (`sdesbench --version`,
and the provenance of every run record). Imports nothing heavy: `--version` must answer at once."""
from __future__ import annotations

import subprocess
from pathlib import Path

from sdesbench import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):  # no git here: provenance is then simply unknown
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """HEAD of the checkout this package runs from; None for an installed package, even one installed
    inside some other repository (a project's .venv): the checkout's top must hold this package."""
    top = _git("rev-parse", "--show-toplevel")
    if not top or Path(top).resolve() != PACKAGE_DIR.parent:
        return None
    return _git("rev-parse", "HEAD") or None


def version_line() -> str:
    """`sdesbench 0.1.0`, with `(git <commit>)` from a checkout, `+ uncommitted changes` when it has some."""
    commit = git_commit()
    if commit is None:
        return f"sdesbench {__version__}"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", str(PACKAGE_DIR)))
    return f"sdesbench {__version__} (git {commit[:12]}{' + uncommitted changes' if dirty else ''})"
