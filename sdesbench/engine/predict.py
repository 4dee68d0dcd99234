"""A trained run brought back to predict (`sdesbench show`, `report --qualitative`).

`load_run` restores the run's network and method modules from its checkpoint (`engine/restore.py`:
the checkpoint's own weights, never ImageNet's, and nothing of the training set-up). `predict` gives
the class maps of the student and of every extra prediction the method has (SDES's Ens-T) for chosen
images of a split, scored as the evaluation scores them (`inference.predictions` under the run's eval
settings: eval.scale / eval.size, sliding windows, test-time augmentation; label-sized).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from sdesbench.data.base import EvalView, SegDataset, build_dataset
from sdesbench.engine.inference import Inference, predictions
from sdesbench.engine.metrics import predict as class_map
from sdesbench.engine.restore import Restored, restore
from sdesbench.engine.runtime import pick_device
from sdesbench.errors import CheckpointError, DataError


@dataclass
class TrainedRun:
    folder: Path
    restored: Restored  # network and method modules with the checkpoint's weights, eval mode

    @property
    def cfg(self):
        return self.restored.cfg

    @property
    def iteration(self) -> int:
        return self.restored.iteration

    def dataset(self, split: str | None = None) -> SegDataset:
        """The run's dataset at `split` (default: its evaluation split)."""
        cfg = self.cfg
        return build_dataset(cfg.data.name, cfg.data.root, split or cfg.data.eval_split)


def restore_weights_command(folder: Path) -> str:
    """The command that brings back a recorded run's weights by training it again (the record's
    configuration, into its own folder): what to advise when only the record is here."""
    return f"sdesbench train --config {shlex.quote(str(folder / 'config.yaml'))} --out {shlex.quote(str(folder))} " \
           "--restore-weights"


def load_run(folder: str | Path, device: str = "cpu") -> TrainedRun:
    """The run in `folder` (its `checkpoints/last.pt`) ready to predict; one-line errors otherwise."""
    folder = Path(folder)
    ckpt = folder / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        if (folder / "results.json").is_file() and (folder / "config.yaml").is_file():
            raise CheckpointError(f"{folder} has its record but no checkpoint (checkpoints are not kept in git); "
                                  f"bring its weights back with `{restore_weights_command(folder)}`")
        raise CheckpointError(f"{folder} has no checkpoint to predict with")
    return TrainedRun(folder, restore(ckpt, pick_device(device), with_method=True))


@torch.no_grad()
def predict(run: TrainedRun, dataset: SegDataset, indices: list[int]) -> dict[str, list[torch.Tensor]]:
    """prediction name ("student", "ens_t", ...) -> one H x W class map (CPU) per image of `indices`."""
    net, cfg = run.restored, run.cfg
    if dataset.num_classes != net.num_classes:
        raise DataError(f"{run.folder} predicts {net.num_classes} classes, {dataset.name} has {dataset.num_classes}")
    view = EvalView(dataset)
    device = next(net.model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {}
    for i in indices:
        image, label = view[i]
        logits = predictions(net.model, image[None].to(device), label[None].to(device), net.method, None,
                             Inference.of(cfg.eval))
        for name, value in logits.items():
            out.setdefault(name, []).append(class_map(value)[0].cpu())
    return out
