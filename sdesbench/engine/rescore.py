"""A trained checkpoint evaluated again (`sdesbench eval`): under the run's eval settings or others given as
`eval.*` overrides (sliding windows, test-time augmentation, the absent-class convention, ...), optionally
writing each image's prediction as a PNG (`export`) and recording the numbers beside the run (`record`:
`<run>/evaluations/<key>.json`, an `EvaluationRecord` that `sdesbench report --eval-set` reads; for the
run's `checkpoints/best.pt`, `train.keep_best`, `<run>/evaluations/best/<key>.json`).

What is scored: every image of the split, unless `eval.max_images` is set with `--set`; a recorded
evaluation scores what the run's own final evaluation scored (its split's first `eval.max_images` images), so
that the report sets the two numbers side by side on the same images. A recorded evaluation also scores the
method's extra predictions (SDES's Ens-T), as the run's record does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sdesbench.config import RunConfig
from sdesbench.data.base import EvalView, SegDataset, build_dataset
from sdesbench.data.files import PredictionFiles
from sdesbench.engine.configure import build_config
from sdesbench.engine.evaluate import evaluate
from sdesbench.engine.inference import Inference
from sdesbench.engine.metrics import miou_convention
from sdesbench.engine.record import EvaluationRecord, Scores, read_record, write_evaluation
from sdesbench.engine.restore import restore
from sdesbench.engine.runtime import pick_device, provenance
from sdesbench.errors import ConfigError, SdesbenchError


@dataclass
class CheckpointScores:
    """What `evaluate_checkpoint` scored, with what, and what it wrote."""

    checkpoint: Path
    iteration: int
    cfg: RunConfig  # the run's configuration with the overrides applied
    dataset: SegDataset
    images: int
    inference: Inference
    metrics: dict[str, dict[str, Any]]  # prediction name -> `ConfusionMatrix.compute` result
    exported: Path | None = None
    recorded: Path | None = None

    @property
    def convention(self) -> str:
        return miou_convention(self.cfg.eval.absent_classes, self.dataset.num_classes)


def check_eval_overrides(sets: Sequence[str]) -> None:
    """`eval --set` changes how the checkpoint is evaluated, never what it is: eval.* keys only."""
    for text in sets:
        if not text.split("=", 1)[0].strip().startswith("eval."):
            raise ConfigError(f"eval --set takes eval.* settings (the network is the checkpoint's), got {text!r}")


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint `<run>/checkpoints/<name>.pt` belongs to (`--record` writes there)."""
    folder = checkpoint.resolve().parent.parent
    if checkpoint.resolve().parent.name != "checkpoints" or not (folder / "results.json").is_file():
        raise SdesbenchError(f"--record needs the checkpoint of a run folder (<run>/checkpoints/last.pt beside "
                             f"<run>/results.json); {checkpoint} is not one")
    return folder


def evaluate_checkpoint(checkpoint: Path, device: str = "auto", sets: Sequence[str] = (),
                        split: str | None = None, data_root: Path | None = None, workers: int | None = None,
                        export: Path | None = None, record: bool = False,
                        confusion: bool = False) -> CheckpointScores:
    """Evaluate `checkpoint` (module docstring); `sets` are `eval.*` overrides; `confusion`: each prediction's
    metrics also hold its confusion matrix ("confusion", `evaluate`)."""
    check_eval_overrides(sets)
    folder, run = None, None
    if record:
        folder = run_folder_of(checkpoint)
        run = read_record(folder)
        if run is None or not run.completed:
            raise SdesbenchError(f"--record: the run in {folder} is not completed")
    net = restore(checkpoint, pick_device(device), with_method=record)  # its own weights, no training set-up
    which = "best" if checkpoint.name == "best.pt" else "last"  # best.pt: `train.keep_best`
    if run is not None and which == "best" and (run.best is None or net.iteration != run.best.iteration):
        raise SdesbenchError(f"--record: {checkpoint} is iteration {net.iteration}, not the best periodic evaluation "
                             f"of the run in {folder} ({run.best.iteration if run.best else 'none recorded'})")
    if run is not None and which == "last" and net.iteration != run.iterations:
        raise SdesbenchError(f"--record scores a run's final checkpoint: {checkpoint} is iteration {net.iteration}, "
                             f"the run in {folder} finished at {run.iterations}")
    extra = [f"data.root={json.dumps(str(data_root))}"] if data_root is not None else []
    cfg = build_config(net.cfg.to_dict(), list(sets) + extra)
    ds = build_dataset(cfg.data.name, cfg.data.root, split or cfg.data.eval_split)
    limited = record or any(s.split("=", 1)[0].strip() == "eval.max_images" for s in sets)
    view = EvalView(ds, cfg.eval.max_images if limited else None)
    files = PredictionFiles(ds, export, len(view)) if export is not None else None
    how = Inference.of(cfg.eval)
    dev = next(net.model.parameters()).device
    metrics = evaluate(net.model, view, net.num_classes, dev, cfg.eval.batch_size, method=net.method,
                       inference=how, absent=cfg.eval.absent_classes,
                       workers=workers if workers is not None else cfg.eval.loader_workers(cfg.data),
                       export=files.write if files is not None else None, confusion=confusion)
    scores = CheckpointScores(checkpoint, net.iteration, cfg, ds, len(view), how, metrics, exported=export)
    if run is not None:
        scores.recorded = write_evaluation(folder, evaluation_record(scores, run.config_hash), which)
    return scores


def evaluation_record(scores: CheckpointScores, run_config_hash: str) -> EvaluationRecord:
    cfg, split = scores.cfg, scores.dataset.split
    student = scores.metrics["student"]
    prov = provenance()
    return EvaluationRecord(
        key=cfg.evaluation_key(split), settings=cfg.evaluation_identity(split),
        description=f"{scores.inference.describe()}; {scores.convention}", run_config_hash=run_config_hash,
        iteration=scores.iteration, split=split, images=scores.images, metrics=Scores.of(student),
        per_class_iou=dict(zip(scores.dataset.class_names, student["per_class_iou"])),
        extra_metrics={k: Scores.of(v) for k, v in scores.metrics.items() if k != "student"},
        sdesbench_version=prov["sdesbench_version"], git_commit=prov["git_commit"], finished_at=prov["finished_at"])
