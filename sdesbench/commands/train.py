"""`sdesbench train` (one run) and `sdesbench eval` (a checkpoint on whole images)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sdesbench.commands._shared import out


def _train_config(config: Optional[Path], cli_values: dict[str, object], sets: list[str]):
    from sdesbench.config import load_yaml
    from sdesbench.engine.configure import build_config

    data = load_yaml(config) if config else {}
    cli_sets = [f"{key}={json.dumps(str(value)) if isinstance(value, (str, Path)) else value}"
                for key, value in cli_values.items() if value is not None]
    return build_config(data, cli_sets + list(sets or []))


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
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    ):
        """Train one run and evaluate it; writes OUT/results.json."""
        from sdesbench.engine import distributed as D
        from sdesbench.engine.trainer import train as run_train

        cfg = _train_config(config, {"model.name": model, "method.name": method, "data.name": dataset,
                                     "data.root": data_root, "train.iters": iters, "train.seed": seed,
                                     "output.dir": out_dir, "train.device": device}, sets)
        D.init_from_env()
        main = D.is_main()
        try:
            rec = run_train(cfg, resume="required" if resume else "never", show_progress=progress)
        finally:
            D.cleanup()
        if main:
            m = rec.metrics
            extra = "".join(f"  {k}: mIoU {100 * v.miou:.2f}" for k, v in rec.extra_metrics.items())
            out.print(f"{cfg.method.name} / {cfg.model.name} / {cfg.data.name}: mIoU {100 * m.miou:.2f}  "
                      f"PA {100 * m.pixel_acc:.2f}{extra}  ({rec.iterations} iters, {rec.wall_time_s:.0f} s) "
                      f"-> {Path(cfg.output.dir) / 'results.json'}")

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
        workers: Optional[int] = typer.Option(None, min=0, help="Loader workers decoding the images (default: the "
                                              "run's eval.workers, else its data.workers)."),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    ):
        """Evaluate a checkpoint on whole images (mIoU, pixel accuracy, per-class IoU), optionally resized."""
        from sdesbench.data.base import EvalView, build_dataset
        from sdesbench.engine.configure import build_config
        from sdesbench.engine.evaluate import evaluate
        from sdesbench.engine.runtime import pick_device
        from sdesbench.errors import ConfigError
        from sdesbench.io import load_checkpoint
        from sdesbench.measure.profile import parse_size
        from sdesbench.models import build_model

        if scale is not None and size is not None:
            raise ConfigError("--scale and --size exclude each other; give one")
        sets = [f"eval.scale={scale}", "eval.size=null"] if scale is not None else []
        if size is not None:
            h, w = parse_size(size, "--size", multiple=1)
            sets += [f"eval.size=[{h}, {w}]", "eval.scale=1.0"]
        state = load_checkpoint(checkpoint)
        cfg = build_config(dict(state["config"]), sets)
        root = str(data_root) if data_root is not None else cfg.data.root
        ds = build_dataset(cfg.data.name, root, split or cfg.data.eval_split)
        model = build_model(cfg.model, state["num_classes"])
        model.load_state_dict(state["model"])
        dev = pick_device(device)
        model.to(dev)
        metrics = evaluate(model, EvalView(ds), state["num_classes"], dev, cfg.eval.batch_size, scale=cfg.eval.scale,
                           size=cfg.eval.size,
                           workers=workers if workers is not None else cfg.eval.loader_workers(cfg.data))["student"]
        if as_json:
            out.print_json(data={"checkpoint": str(checkpoint), "iteration": state["iteration"],
                                 "scale": cfg.eval.scale, "size": cfg.eval.size, **metrics,
                                 "class_names": list(ds.class_names)})
            return
        at = f"size {cfg.eval.size[0]}x{cfg.eval.size[1]}" if cfg.eval.size else f"scale {cfg.eval.scale:g}"
        out.print(f"{checkpoint} (iteration {state['iteration']}, input {at}): mIoU {100 * metrics['miou']:.2f}  "
                  f"PA {100 * metrics['pixel_acc']:.2f}")
        for name, iou in zip(ds.class_names, metrics["per_class_iou"]):
            out.print(f"  {name:<14} {'—' if iou is None else f'{100 * iou:6.2f}'}")
