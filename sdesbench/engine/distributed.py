"""torch.distributed helpers. Launched by torchrun, the env vars RANK/WORLD_SIZE/LOCAL_RANK are set;
without them everything degrades to a single process (rank 0 of 1)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler


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


def init_from_env() -> bool:
    """Initialise the process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend)
    return True


def shard_sampler(dataset: Dataset) -> DistributedSampler:
    """Evaluation shards: no padding duplicates would bias the confusion matrix, so shard by stride."""
    return DistributedSampler(dataset, shuffle=False, drop_last=False)


def wrap(module: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    if not is_distributed():
        return module
    if sync_bn:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
