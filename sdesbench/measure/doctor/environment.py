"""The environment report of `sdesbench doctor`: Python, torch, CUDA, cuDNN and NCCL versions, the GPUs
(name, memory, compute capability, bf16), free disk in the results folder; and for each backbone
whether its ImageNet weights are found without network (Hugging Face / torch hub cache, or a file given
with `--weights`), else the line that says how to provide them (reported, never failed: only the
`paper` presets need them)."""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from sdesbench.errors import SdesbenchError
from sdesbench.models.deeplabv3 import BACKBONES, cached_weights, create_timm


def weights_status(weights: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Per backbone: where its ImageNet weights are (a given file that loads, or the offline cache), or
    the one line that says how to provide them."""
    rows = []
    for model, timm_name in BACKBONES.items():
        given = (weights or {}).get(timm_name)
        row: dict[str, Any] = {"model": model, "backbone": timm_name, "found": False, "where": None, "hint": None}
        if given:
            try:
                create_timm(timm_name, True, given, features_only=True)
                row.update(found=True, where=given)
            except SdesbenchError as e:
                row["hint"] = str(e)
        else:
            where = cached_weights(timm_name)
            row.update(found=where is not None, where=where)
        if not row["found"] and not row["hint"]:
            row["hint"] = (f"{timm_name}: no ImageNet weights here; on a machine with network run `python -c \"import "
                           f"timm; timm.create_model('{timm_name}', pretrained=True)\"` and copy ~/.cache/huggingface "
                           f"here, or pass --set model.weights=/path/{timm_name}.pth")
        rows.append(row)
    return rows


def environment(device: torch.device, results: Path) -> dict[str, Any]:
    import timm
    import torchvision

    folder = Path(results).resolve()
    while not folder.exists():
        folder = folder.parent
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "timm": timm.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": None, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpus": [], "bf16": False, "results_folder": str(folder),
        "free_disk_gb": round(shutil.disk_usage(folder).free / 2**30, 1),
    }
    if torch.cuda.is_available():
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - a build without NCCL: reported as absent
            env["nccl"] = None
        env["bf16"] = torch.cuda.is_bf16_supported()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                                "capability": f"{p.major}.{p.minor}"})
    return env
