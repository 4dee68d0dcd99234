"""The DDP check of `sdesbench doctor`: with two GPUs or more (nccl), or on a CPU-only machine (gloo), a
2-process run through the launcher's own process-group entry, whose recorded evaluation must equal the
single-process evaluation of the checkpoint it wrote."""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from sdesbench.data.base import EvalView
from sdesbench.data.tiny import TinyScenes
from sdesbench.engine.configure import build_config
from sdesbench.engine.evaluate import evaluate
from sdesbench.experiments.launch import train_in_process_group
from sdesbench.io import load_checkpoint
from sdesbench.models import build_model


def ddp_entry(device: torch.device, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The report's `ddp` entry: why the check is skipped here, or `check_ddp`'s result."""
    cuda = device.type == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    if quick:
        return {"skipped": "--quick"}
    if cuda and gpus < 2:
        return {"skipped": f"needs 2 GPUs, this machine has {gpus}"}
    if not cuda and torch.cuda.is_available():
        return {"skipped": "--device cpu on a CUDA machine (the process group would use nccl)"}
    log("ddp: 2 processes")
    return check_ddp(device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, cfg_dict: dict[str, Any], cwd: str) -> None:
    """One process of the doctor's DDP run (the environment torchrun would set)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    train_in_process_group(cfg_dict, cwd)


def check_ddp(device: torch.device, world: int = 2, iters: int = 2, images: int = 7) -> dict[str, Any]:
    """A `world`-process run (nccl on CUDA, one GPU each; gloo on CPU) whose recorded evaluation must
    equal the single-process evaluation of the checkpoint it wrote (`images` odd: the ranks' shares
    differ)."""
    t0 = time.perf_counter()
    backend = "nccl" if device.type == "cuda" else "gloo"
    result: dict[str, Any] = {"backend": backend, "processes": world, "passed": False}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = build_config({}, [f"train.iters={iters}", "data.batch_size=2", "data.crop=32",
                                f"eval.max_images={images}", f"train.device={device.type}", f"output.dir={out}",
                                "train.checkpoint_every=1000"])
        try:
            mp.start_processes(_ddp_rank, args=(world, _free_port(), cfg.to_dict(), os.getcwd()), nprocs=world,
                               join=True, start_method="spawn")
            record = load_checkpoint(out / "checkpoints" / "last.pt")
            recorded = json.loads((out / "results.json").read_text())
            model = build_model(cfg.model, record["num_classes"])
            model.load_state_dict(record["model"])
            single = evaluate(model.to(device), EvalView(TinyScenes(None, "val"), images), record["num_classes"],
                              device)["student"]
        except Exception as e:  # noqa: BLE001 - reported as this check's failure
            result["failure"] = f"DDP ({backend}, {world} processes): raised {type(e).__name__}: " \
                                f"{(str(e).strip().splitlines() or [''])[0][:200]}"
            return result
    same = (recorded["metrics"]["miou"] == single["miou"] and recorded["metrics"]["pixel_acc"] == single["pixel_acc"]
            and list(recorded["per_class_iou"].values()) == single["per_class_iou"])
    result.update(passed=bool(same and recorded.get("world_size") == world), miou_ddp=recorded["metrics"]["miou"],
                  miou_single=single["miou"], world_size=recorded.get("world_size"),
                  seconds=round(time.perf_counter() - t0, 1))
    if not result["passed"]:
        result["failure"] = (f"DDP ({backend}, {world} processes): recorded mIoU {recorded['metrics']['miou']!r} "
                             f"!= single-process evaluation of its checkpoint {single['miou']!r}")
    return result
