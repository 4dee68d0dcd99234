"""`sdesbench train` (one run) and `sdesbench eval` (a checkpoint, whole images or as `--set eval.*` asks)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sdesbench.console import out


def _train_config(config: Optional[Path], cli_values: dict[str, object], sets: list[str]):
    from sdesbench.config import load_yaml
    from sdesbench.engine.configure import build_config

    data = load_yaml(config) if config else {}
    cli_sets = [f"{key}={json.dumps(str(value)) if isinstance(value, (str, Path)) else value}"
                for key, value in cli_values.items() if value is not None]
    return build_config(data, cli_sets + list(sets or []), relative_to=config.parent if config else None)


def time_line(rec) -> str:
    """Where the run's wall time went (`RunRecord.timings`), so that its rates can be checked against it."""
    t = rec.timings
    other = rec.wall_time_s - (t.setup_s + t.data_check_s + t.train_s + t.eval_s + t.checkpoint_s)
    rate = f", {rec.iters_per_s:.2f} it/s" if rec.iters_per_s else ""
    return (f"time: {rec.wall_time_s:.1f} s wall = setup {t.setup_s:.1f} + data check {t.data_check_s:.1f} + "
            f"training {t.train_s:.1f} (steps {rec.step_time_s:.1f}, loader waits "
            f"{max(t.train_s - rec.step_time_s, 0):.1f}{rate}) + evaluation {t.eval_s:.1f} + checkpoints "
            f"{t.checkpoint_s:.1f} + other {max(other, 0):.1f}")


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run configuration."),
        model: Optional[str] = typer.Option(None, help="Model name (see `sdesbench list models`)."),
        method: Optional[str] = typer.Option(None, help="Method name (see `sdesbench list methods`)."),
        dataset: Optional[str] = typer.Option(None, help="Dataset name (see `sdesbench list datasets`)."),
        data_root: Optional[Path] = typer.Option(None, help="Dataset folder (default: $SDESBENCH_DATA/<dataset>)."),
        iters: Optional[int] = typer.Option(None, help="Training iterations."),
        seed: Optional[int] = typer.Option(None, help="Random seed."),
        out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder for checkpoints and results.json."),
        sets: list[str] = typer.Option([], "--set", help="Override any config value: section.key=value (repeatable)."),
        device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
        resume: bool = typer.Option(False, "--resume", help="Continue from the output folder's last checkpoint "
                                    "(required when the folder holds one; refused when it holds none)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress: a live bar on a "
                                      "terminal, a plain line every train.log_every iterations elsewhere (a log)."),
        restore_weights: bool = typer.Option(False, "--restore-weights", help="The folder holds a completed run's "
                                             "record but not its checkpoint (a fresh clone): train it again from "
                                             "its configuration (--config OUT/config.yaml) to bring its weights "
                                             "back, and say whether it reproduces the record."),
        nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1, help="Train on this many "
                                                     "processes of this machine under DDP (one GPU each; gloo on "
                                                     "CPU), started by torchrun's agent as `torchrun --standalone` "
                                                     "would (docs/performance.md)."),
        max_restarts: int = typer.Option(0, "--max-restarts", min=0, help="With --nproc-per-node: restart the "
                                         "process group this many times after a rank dies; it continues from the "
                                         "last checkpoint. With none left the run is recorded failed."),
    ):
        """Train one run and evaluate it; writes OUT/results.json."""
        from sdesbench.engine import distributed as D
        from sdesbench.engine.trainer import train as run_train
        from sdesbench.errors import ConfigError, SdesbenchError

        cfg = _train_config(config, {"model.name": model, "method.name": method, "data.name": dataset,
                                     "data.root": data_root, "train.iters": iters, "train.seed": seed,
                                     "output.dir": out_dir, "train.device": device}, sets)
        if resume and restore_weights:
            raise ConfigError("--resume and --restore-weights exclude each other")
        if max_restarts and nproc_per_node is None:
            raise ConfigError("--max-restarts needs --nproc-per-node (under torchrun, give torchrun --max-restarts)")
        mode = "restore" if restore_weights else "required" if resume else "never"
        if nproc_per_node is not None:
            from sdesbench.engine.elastic import launch

            rec, main = launch(cfg, nproc_per_node, max_restarts, mode, progress), True
        else:
            D.init_from_env(cfg.train.dist_timeout_s)
            main = D.is_main()
            try:
                rec = run_train(cfg, resume=mode, show_progress=progress)
            except SdesbenchError as e:  # under torchrun: its failure summary shows this line (engine/elastic.py)
                D.write_error_file(str(e))
                raise
            finally:
                D.cleanup()
        if main:
            m = rec.metrics
            extra = "".join(f"  {k}: mIoU {100 * v.miou:.2f}" for k, v in rec.extra_metrics.items())
            out.print(f"{cfg.method.name} / {cfg.model.name} / {cfg.data.name}: mIoU {100 * m.miou:.2f}  "
                      f"PA {100 * m.pixel_acc:.2f}  mAcc {100 * m.macc:.2f}{extra}  ({rec.iterations} iters) "
                      f"-> {Path(cfg.output.dir) / 'results.json'}")
            out.print(time_line(rec))

    @app.command("eval")
    def eval_cmd(
        checkpoint: Path = typer.Argument(..., help="A checkpoint written by `sdesbench train`."),
        data_root: Optional[Path] = typer.Option(None, help="Dataset folder (default: the one it was trained on)."),
        split: Optional[str] = typer.Option(None, help="Split to evaluate (default: the run's eval split)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
        scale: Optional[float] = typer.Option(None, help="Resize the input by this factor for inference; logits are "
                                              "resized back and scored at the label's size (default: the run's "
                                              "eval.scale)."),
        size: Optional[str] = typer.Option(None, help="Resize the input to HxW instead (e.g. 180x240)."),
        sets: list[str] = typer.Option([], "--set", help="Evaluate with another eval setting: eval.key=value "
                                       "(repeatable), e.g. eval.mode=slide eval.crop=[512,512] eval.stride=[341,341], "
                                       "or 'eval.scales=[0.5,0.75,1.0,1.25,1.5,1.75]' eval.flip=true "
                                       "(docs/evaluation.md)."),
        export: Optional[Path] = typer.Option(None, "--export", help="Also write each image's prediction to this "
                                              "folder as a PNG named after the image, in the ids its benchmark reads "
                                              "(Cityscapes: label ids; ADE20K, Pascal Context: 1-based class ids; "
                                              "COCO-Stuff: COCO category ids; else train ids)."),
        record: bool = typer.Option(False, "--record", help="Record the numbers beside the run "
                                    "(<run>/evaluations/<key>.json), on the images its own final evaluation scored, "
                                    "for `sdesbench report --eval-set` (the checkpoint must be the run's last.pt, or its best.pt "
                                    "for `report --checkpoint best`: <run>/evaluations/best/<key>.json)."),
        workers: Optional[int] = typer.Option(None, min=0, help="Loader workers decoding the images (default: the "
                                              "run's eval.workers, else its data.workers)."),
        confusion: Optional[Path] = typer.Option(None, "--confusion", help="Also write the student's confusion "
                                                 "matrix to this folder: confusion.csv (pixel counts, rows = label "
                                                 "classes) and confusion.png (a heat map of the rows in %)."),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    ):
        """Evaluate a checkpoint (mIoU, PA, mAcc, mDice, mFscore, per-class IoU and accuracy): whole images by
        default, or as --set asks."""
        from sdesbench.engine.rescore import evaluate_checkpoint
        from sdesbench.errors import ConfigError
        from sdesbench.measure.profile import parse_size

        if scale is not None and size is not None:
            raise ConfigError("--scale and --size exclude each other; give one")
        cli_sets = [f"eval.scale={scale}", "eval.size=null"] if scale is not None else []
        if size is not None:
            h, w = parse_size(size, "--size", multiple=1)
            cli_sets += [f"eval.size=[{h}, {w}]", "eval.scale=1.0"]
        if confusion is not None and confusion.exists() and not confusion.is_dir():
            raise ConfigError(f"--confusion {confusion}: not a folder (it is a file); give a folder to write "
                              "confusion.csv and confusion.png into")
        res = evaluate_checkpoint(checkpoint, device, cli_sets + list(sets), split, data_root, workers, export, record,
                                  confusion=confusion is not None)
        ds, ev, metrics = res.dataset, res.cfg.eval, res.metrics["student"]
        written = None
        if confusion is not None:
            from sdesbench.report.confusion import write_confusion

            title = f"{ds.name}/{ds.split}, {res.images} images, {checkpoint.name} (iteration {res.iteration})"
            written = write_confusion(confusion, metrics["confusion"].numpy(), ds.class_names, title)
            for m in res.metrics.values():
                m.pop("confusion", None)
        root = str(ds.root) if ds.root is not None else None
        if as_json:
            out.print_json(data={"checkpoint": str(checkpoint), "iteration": res.iteration, "dataset": ds.name,
                                 "split": ds.split, "root": root, "images": res.images,
                                 "scale": ev.scale, "size": ev.size, "inference": res.inference.describe(),
                                 "convention": res.convention, **metrics,
                                 "extra": {k: v for k, v in res.metrics.items() if k != "student"},
                                 "class_names": list(ds.class_names),
                                 "exported": str(res.exported) if res.exported else None,
                                 "confusion": [str(p) for p in written] if written else None,
                                 "recorded": str(res.recorded) if res.recorded else None})
            return
        where = f"at {root}" if root is not None else "generated"
        at = (f"fit to {ev.size[0]}x{ev.size[1]} keeping its ratio" if ev.size and ev.resize == "keep_ratio" else
              f"size {ev.size[0]}x{ev.size[1]}" if ev.size else f"scale {ev.scale:g}")
        views = "" if res.inference.plain else "; " + ", ".join(res.inference.views_text())
        out.print(f"{checkpoint} (iteration {res.iteration}) on {ds.name}/{ds.split} ({where}, {res.images} images, "
                  f"input {at}{views}): mIoU {100 * metrics['miou']:.2f}  PA {100 * metrics['pixel_acc']:.2f}"
                  f"  mAcc {100 * metrics['macc']:.2f}  mDice {100 * metrics['mdice']:.2f}"
                  f"  mFscore {100 * metrics['mfscore']:.2f}", soft_wrap=True, highlight=False)
        for name, extra in res.metrics.items():
            if name != "student":
                out.print(f"  {name}: mIoU {100 * extra['miou']:.2f}  PA {100 * extra['pixel_acc']:.2f}  "
                          f"mAcc {100 * extra['macc']:.2f}  mDice {100 * extra['mdice']:.2f}  "
                          f"mFscore {100 * extra['mfscore']:.2f}", highlight=False)
        pct = lambda v: "     —" if v is None else f"{100 * v:6.2f}"  # noqa: E731
        out.print(f"  {'class':<14} {'IoU':>6} {'Acc':>6}", highlight=False)
        for name, iou, acc in zip(ds.class_names, metrics["per_class_iou"], metrics["per_class_acc"]):
            out.print(f"  {name:<14} {pct(iou)} {pct(acc)}", highlight=False)
        out.print(res.convention + ".", soft_wrap=True, highlight=False)
        if res.exported:
            out.print(f"predictions of {res.images} images -> {res.exported}", soft_wrap=True, highlight=False)
        if res.recorded:
            out.print(f"recorded -> {res.recorded}", soft_wrap=True, highlight=False)
        if written:
            out.print(f"confusion matrix -> {written[0]}, {written[1]}", soft_wrap=True, highlight=False)
