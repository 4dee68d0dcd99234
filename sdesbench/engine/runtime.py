"""Where and how a run executes: device, precision, memory layout, the run lock, provenance.

Everything here is read once when a run (or a benchmark) starts and is the same for every step.
"""
from __future__ import annotations

import fcntl
import os
import platform
import resource
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ContextManager

import torch

from sdesbench import __version__
from sdesbench.engine import distributed as D
from sdesbench.errors import RunLocked, SdesbenchError
from sdesbench.version import git_commit


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", D.local_rank()) if D.is_distributed() else torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SdesbenchError(f"train.device={name} but no CUDA device is available (use cpu or auto)")
    if name == "cuda" and D.is_distributed():
        return torch.device("cuda", D.local_rank())  # one GPU per torchrun process
    return torch.device(name)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the device supports it, fp16 (with a GradScaler) otherwise; CPU runs in fp32."""
    if mode == "off" or device.type != "cuda":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


@dataclass(frozen=True)
class Runtime:
    """Device, autocast dtype (None = fp32) and memory layout of every step of a run."""

    device: torch.device
    amp: torch.dtype | None = None
    channels_last: bool = False

    @classmethod
    def create(cls, device: str = "auto", amp: str = "off", channels_last: bool = False) -> "Runtime":
        dev = pick_device(device)
        return cls(dev, amp_dtype(amp, dev), channels_last and dev.type == "cuda")

    def autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def amp_name(self) -> str:
        return str(self.amp).replace("torch.", "") if self.amp else "off"

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else str(self.device)


def set_determinism(deterministic: bool) -> None:
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


# Linux: writing "5" to clear_refs resets the process's peak resident set (VmHWM in /proc/self/status)
CLEAR_REFS, PROC_STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for `peak_memory_mb`: `run` trains its runs one after another in one process, and
    each record's peak must be its own run's, not the largest so far. Where the OS offers no reset (CPU
    outside Linux), the peak stays the process's lifetime maximum."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since the last `reset_peak_memory`: CUDA's allocator peak, or the peak resident set on
    CPU (Linux's VmHWM; elsewhere the process's max RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def provenance() -> dict[str, Any]:
    """Versions and commit that produced a record."""
    return {"torch_version": torch.__version__, "sdesbench_version": __version__, "git_commit": git_commit(),
            "python": platform.python_version(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class RunLock:
    """An exclusive lock per output folder: two processes never write the same run."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise RunLocked(f"another process is writing the run in {self.path.parent}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
