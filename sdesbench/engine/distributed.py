"""torch.distributed helpers. Launched by torchrun, the env vars RANK/WORLD_SIZE/LOCAL_RANK are set;
without them everything degrades to a single process (rank 0 of 1).

Faults (docs/performance.md, "Faults under torchrun"). torchrun's agent restarts the whole group when a
rank dies, up to `--max-restarts` times, and tells the new processes how many restarts came before
(`TORCHELASTIC_RESTART_COUNT`, `restart_count`): the Trainer then continues the run's last checkpoint. A
rank that survives a dead or hung peer sees its next collective fail (gloo: the peer's connection reset)
or time out after `train.dist_timeout_s` (`init_from_env`); `collective_fault` turns that error into one
line (`DistributedFault`), and the Trainer records the run as failed with it.
"""
from __future__ import annotations

import json
import os
import re
import time
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

from sdesbench.errors import DistributedFault, PeerLost, SdesbenchError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(timeout_s: float | None = None) -> bool:
    """Initialise the process group when launched by torchrun (nccl on CUDA, gloo on CPU). `timeout_s`
    (`train.dist_timeout_s`; None: torch's default, 30 minutes): how long a collective waits for the
    other ranks before it fails."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
    if restart_count() == 0:
        dist.init_process_group(backend, timeout=timeout)
        return True
    # A restarted group meets in the store of torchrun's agent, which still holds the keys of the group before
    # it (gloo's and NCCL's addresses of the dead processes: connecting to them is refused): meet under a
    # prefix of this restart's own (pytorch/pytorch#135712)
    store, rank_, world = next(dist.rendezvous("env://", **({"timeout": timeout} if timeout else {})))
    dist.init_process_group(backend, store=dist.PrefixStore(f"sdesbench_restart_{restart_count()}", store),
                            rank=rank_, world_size=world, timeout=timeout)
    return True


def under_torchrun() -> bool:
    """Whether this process is a rank that torchrun's agent started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def write_error_file(line: str) -> None:
    """A rank's one-line error, in torchrun's per-rank error file when its agent gave one: torchrun's failure
    summary (and `engine/elastic.py`) then show this line instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:
        pass  # the line is printed or recorded anyway; the summary falls back to torchrun's own


def restart_count() -> int:
    """How many times torchrun's agent restarted this process group (0: its first start, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0)


def restarts_left() -> int | None:
    """The restarts torchrun still allows after this start (`--max-restarts` less those used); None
    outside torchrun's agent."""
    most = os.environ.get("TORCHELASTIC_MAX_RESTARTS")
    return None if most is None else max(int(most) - restart_count(), 0)


# what the backends say when a peer is gone or late: gloo's "Connection reset by peer", "Connection closed by
# peer", "Timed out waiting 5000ms for recv operation", NCCL's watchdog "Watchdog caught collective operation timeout"
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_BACKENDS = re.compile(r"gloo|nccl|c10d|ProcessGroup", re.IGNORECASE)


def collective_fault(e: BaseException, iteration: int, timeout_s: float | None) -> DistributedFault | None:
    """The one line for a collective that failed because another rank died or hung (None for any other
    error, which stays what it is); `iteration`: those done (the failing one is the next). torch raises `DistBackendError` (a RuntimeError) or, from gloo's
    transport, a plain RuntimeError whose message names the file in gloo."""
    if not is_distributed() or not isinstance(e, RuntimeError):
        return None
    text = str(e).strip()
    if not (isinstance(e, dist.DistError) or _BACKENDS.search(text)):
        return None
    where = f"rank {rank()} of {world_size()} at iteration {iteration + 1}"
    if _TIMEOUT.search(text):
        limit = f"train.dist_timeout_s={timeout_s:g} s" if timeout_s is not None else "the process group's timeout"
        return DistributedFault(f"{where}: a collective did not complete within {limit} (another rank hangs "
                                "or died)")
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0])  # gloo's "[.../pair.cc:545] " prefix
    detail = detail.split(". This is typically")[0]  # gloo's advice, which we replace with ours
    return PeerLost(f"{where}: lost another rank of the process group ({detail})")


class StridedShard(Sampler):
    """Rank r of w takes indices r, r + w, r + 2w, ...: every index exactly once over all ranks.

    torch's DistributedSampler pads the last round with repeated indices when len % world != 0,
    which would count those images twice in the all-reduced confusion matrix; this does not pad
    (ranks may get one image less than others, which evaluation tolerates: no collective runs per batch).
    """

    def __init__(self, n: int, rank: int, world_size: int):
        self.n, self.rank, self.world = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def shard_sampler(dataset: Dataset) -> StridedShard:
    """This rank's share of an evaluation set, without padding duplicates."""
    return StridedShard(len(dataset), rank(), world_size())


def broadcast_state(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank.

    DDP keeps parameters equal, but BatchNorm running statistics drift per rank after the last
    forward (without SyncBatchNorm); evaluation and checkpoints must all use rank 0's.
    """
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def gather_rows(rows: torch.Tensor, indices: list[int], n: int) -> torch.Tensor:
    """Every rank's `rows` (one per dataset index in `indices`, in that order) placed at their indices
    in one n x ... tensor on every rank (outside DDP: this process's rows, put in index order)."""
    parts: list[Any] = [(indices, rows.cpu())]
    if is_distributed():
        parts = [None] * world_size()
        dist.all_gather_object(parts, (indices, rows.cpu()))
    out = torch.zeros((n, *rows.shape[1:]), dtype=rows.dtype)
    for idx, part in parts:
        out[torch.as_tensor(idx, dtype=torch.long)] = part
    return out


def all_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (outside DDP: `[obj]`)."""
    if not is_distributed():
        return [obj]
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def all_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank (so all ranks take the same branch, none hangs)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def mean_over_ranks(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Each value (a scalar tensor) averaged over the ranks, in one all-reduce; the values as floats
    without DDP. Every rank must pass the same keys (every rank computes the same loss terms)."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]).to(device)
    if is_distributed():
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= dist.get_world_size()
    return dict(zip(values, stacked.tolist()))


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def wrap(module: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    if not is_distributed():
        return module
    if sync_bn:
        if device.type != "cuda":
            raise SdesbenchError("train.sync_bn=true needs CUDA devices (SyncBatchNorm has no CPU kernel); "
                                 "leave it false with the gloo backend")
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
