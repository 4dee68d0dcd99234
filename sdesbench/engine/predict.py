"""A trained run brought back to predict (`sdesbench show`, `report --qualitative`).

`load_run` rebuilds the run exactly as the Trainer built it (its configuration from the checkpoint,
the same `Trainer.setup`: student, method modules such as SDES's experts and class split, teacher),
then loads the checkpoint's weights. `predict` gives the class maps of the student and of every
extra prediction the method has (SDES's Ens-T) for chosen images of a split, scored as the
evaluation scores them (`evaluate.predictions`: eval.scale / eval.size, label-sized logits).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sdesbench.data.base import EvalView, SegDataset, build_dataset
from sdesbench.engine.configure import build_config
from sdesbench.engine.evaluate import predictions
from sdesbench.engine.metrics import predict as class_map
from sdesbench.engine.trainer import Trainer
from sdesbench.errors import CheckpointError, DataError
from sdesbench.io import load_checkpoint


@dataclass
class TrainedRun:
    folder: Path
    trainer: Trainer  # set up (datasets, learner) with the checkpoint's weights loaded
    iteration: int

    @property
    def cfg(self):
        return self.trainer.cfg

    def dataset(self, split: str | None = None) -> SegDataset:
        """The run's dataset at `split` (default: its evaluation split)."""
        cfg = self.cfg
        return build_dataset(cfg.data.name, cfg.data.root, split or cfg.data.eval_split)


def load_run(folder: str | Path, device: str = "cpu") -> TrainedRun:
    """The run in `folder` (its `checkpoints/last.pt`) ready to predict; one-line errors otherwise."""
    folder = Path(folder)
    ckpt = folder / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        kept = " (its record is here, its checkpoints are not kept in git)" if (folder / "results.json").is_file() \
            else ""
        raise CheckpointError(f"{folder} has no checkpoint to predict with{kept}")
    state = load_checkpoint(ckpt)
    sets = ["model.pretrained=false", f"train.device={device}", "data.check=false",
            f"output.dir={json.dumps(str(folder))}"]  # its own weights replace ImageNet's
    trainer = Trainer(build_config(dict(state["config"]), sets), show_progress=False)
    trainer.setup()
    try:
        trainer.learner.model.load_state_dict(state["model"])
        trainer.learner.method.load_state_dict(state["method"])
    except RuntimeError:
        raise CheckpointError(f"{ckpt} does not fit the network its configuration describes") from None
    return TrainedRun(folder, trainer, int(state["iteration"]))


@torch.no_grad()
def predict(run: TrainedRun, dataset: SegDataset, indices: list[int]) -> dict[str, list[torch.Tensor]]:
    """prediction name ("student", "ens_t", ...) -> one H x W class map (CPU) per image of `indices`."""
    learner, cfg = run.trainer.learner, run.cfg
    if dataset.num_classes != run.trainer.num_classes:
        raise DataError(f"{run.folder} predicts {run.trainer.num_classes} classes, {dataset.name} has "
                        f"{dataset.num_classes}")
    view = EvalView(dataset)
    device = learner.runtime.device
    learner.model.eval()
    learner.method.eval()
    out: dict[str, list[torch.Tensor]] = {}
    for i in indices:
        image, label = view[i]
        logits = predictions(learner.model, image[None].to(device), label[None].to(device), learner.method,
                             learner.runtime.amp, cfg.eval.scale, cfg.eval.size)
        for name, value in logits.items():
            out.setdefault(name, []).append(class_map(value)[0].cpu())
    return out
