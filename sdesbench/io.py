"""Files the suite writes and reads: atomic writes, checkpoints, JSON records.

Every write goes through `_atomic` (a temporary file in the same folder, fsync, rename), so a
reader never sees half a file and a failed write leaves the previous version intact. A full
disk, whatever layer notices it (the OS, or torch's zip writer), becomes one `StorageError`
line naming the file.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

from sdesbench.errors import CheckpointError, SdesbenchError, StorageError

CHECKPOINT_FORMAT = "sdesbench-checkpoint-v1"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _no_space(e: BaseException) -> bool:
    """Whether `e` says the disk is full: an OSError with ENOSPC/EDQUOT, or torch's zip writer
    reporting a short write (it raises RuntimeError 'enforce fail at inline_container.cc')."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return isinstance(e, RuntimeError) and ("inline_container" in text or "No space left" in text)


@contextmanager
def disk_full_as_error(path: str | Path) -> Iterator[None]:
    """Turn a full disk noticed inside the block into one `StorageError` line naming `path`."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if _no_space(e):
            raise StorageError(f"no space left on device writing {path}") from None
        raise


def _atomic(path: Path, write) -> None:
    with disk_full_as_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are meant to be shared
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def append_bytes(f: BinaryIO, data: bytes, path: str | Path) -> None:
    """Append all of `data` to `f`, a file opened unbuffered (`open(path, "ab", buffering=0)`, so a
    failed write leaves nothing behind to fail again at close). A short write (the disk filling up
    mid-line) is continued; a full disk is one `StorageError` line naming `path`."""
    view = memoryview(data)
    with disk_full_as_error(path):
        while view:
            view = view[f.write(view):]


def write_file(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(f)` into a binary file that atomically becomes `path`, e.g.
    `write_file(png, lambda f: fig.savefig(f, format="png"))`."""
    _atomic(Path(path), write)


def write_json(path: str | Path, data: Any) -> None:
    _atomic(Path(path), lambda f: f.write((json.dumps(data, indent=2, default=str) + "\n").encode()))


def write_text(path: str | Path, text: str) -> None:
    _atomic(Path(path), lambda f: f.write(text.encode()))


def write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def read_json(path: str | Path) -> Any:
    """The parsed file; `StorageError` (one line) when it exists but cannot be read or parsed."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StorageError(f"{p} is unreadable ({type(e).__name__})") from None


def write_torch(path: str | Path, obj: Any) -> None:
    """`torch.save` of tensors / dicts of tensors, atomically (readable with weights_only=True)."""
    _atomic(Path(path), lambda f: torch.save(obj, f))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    write_torch(path, {"format": CHECKPOINT_FORMAT, **state})


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True; a missing or foreign file raises CheckpointError (one line)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles; the one-line error says enough
            warnings.simplefilter("ignore")
            state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{p} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p} is not an sdesbench checkpoint")
    return state


def check_writable(folder: str | Path) -> Path:
    """Create `folder` and prove a file can be written there, before any training starts."""
    p = Path(folder)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise SdesbenchError(f"output folder {p} is not writable ({e.strerror or e})") from None
    return p
