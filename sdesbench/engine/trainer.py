"""The one Trainer used by every method.

Iteration-based SGD with poly decay (torch's PolynomialLR, stepped every iteration), a seeded
and resumable data stream, loss terms from the method, a checkpoint every K iterations and at
the end, evaluation on whole images (optionally resized: eval.scale / eval.size) and one atomic
JSON results record per run.

Output folder layout (`output.dir`):
    config.yaml          the full resolved configuration
    checkpoints/last.pt  model, method modules, optimizer, scheduler, RNG, iteration
    checkpoints/iter_<k>.pt  copies kept every `train.keep_checkpoints_every` iterations (off by default)
    log.jsonl            loss terms and lr every `train.log_every` iterations
    results.json         the results record (status completed | failed | interrupted)
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.optim.lr_scheduler import PolynomialLR
from torch.utils.data import DataLoader

from sdesbench import IGNORE_INDEX, __version__
from sdesbench.config import ModelConfig, RunConfig
from sdesbench.data.check import ensure_checked
from sdesbench.data.base import EvalView, IterationSampler, SegDataset, TrainView, class_pixel_counts
from sdesbench.engine import distributed as D
from sdesbench.engine.io import check_writable, load_checkpoint, save_checkpoint, write_json, write_text
from sdesbench.engine.metrics import ConfusionMatrix, predict
from sdesbench.errors import CheckpointError, Interrupted, NumericalFault, RunLocked, SdesbenchError
from sdesbench.methods.base import Method, MethodContext, StepInfo
from sdesbench.models import build_model, count_params
from sdesbench.models.base import SegmentationModel, to_size
from sdesbench.registry import DATASETS, METHODS

console = Console(stderr=True)


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


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def build_dataset(cfg: RunConfig, split: str) -> SegDataset:
    cls = DATASETS.get(cfg.data.name)
    return cls(cfg.data.root, split)


def load_teacher(cfg: RunConfig, num_classes: int, device: torch.device) -> SegmentationModel:
    """The teacher named by `teacher.model`, weights from `teacher.checkpoint`; eval mode, frozen."""
    if not cfg.teacher.checkpoint:
        raise SdesbenchError(f"method {cfg.method.name!r} needs teacher.checkpoint (train one with `sdesbench train`"
                             " or let `sdesbench run` do it)")
    if not cfg.teacher.model:
        raise SdesbenchError(f"method {cfg.method.name!r} needs teacher.model (the teacher's architecture, "
                             "e.g. deeplabv3_resnet50)")
    state = load_checkpoint(cfg.teacher.checkpoint)
    if state.get("model_name") != cfg.teacher.model:
        raise CheckpointError(f"teacher checkpoint {cfg.teacher.checkpoint} is a {state.get('model_name')}, "
                              f"not the {cfg.teacher.model} the spec names")
    if state.get("num_classes") != num_classes:
        raise CheckpointError(f"teacher checkpoint {cfg.teacher.checkpoint} has {state.get('num_classes')} classes, "
                              f"the dataset has {num_classes}")
    # built as it was trained (an aux head if it had one), never with ImageNet weights: its own replace them
    trained_aux = bool(((state.get("config") or {}).get("model") or {}).get("aux", False))
    teacher = build_model(ModelConfig(name=cfg.teacher.model, aux=trained_aux), num_classes)
    try:
        teacher.load_state_dict(state["model"])
    except RuntimeError:
        raise CheckpointError(f"teacher checkpoint {cfg.teacher.checkpoint} does not fit {cfg.teacher.model}") from None
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def inference_input(images: torch.Tensor, scale: float = 1.0, size: Sequence[int] | None = None) -> torch.Tensor:
    """The evaluation input: `images` resized to `size` (H, W) or to `scale` times their size, bilinear
    and antialiased like the training crops' rescaling (`data.transforms`); unchanged at scale 1."""
    h, w = images.shape[-2:]
    target = (int(size[0]), int(size[1])) if size is not None else (max(1, round(h * scale)), max(1, round(w * scale)))
    if target == (h, w):
        return images
    return F.interpolate(images, size=target, mode="bilinear", align_corners=False, antialias=True)


@torch.no_grad()
def evaluate(model: SegmentationModel, dataset: EvalView, num_classes: int, device: torch.device,
             batch_size: int = 1, method: Method | None = None, amp: torch.dtype | None = None,
             show_progress: bool = False, scale: float = 1.0,
             size: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
    """Evaluation on whole images; returns {"student": metrics, <extra prediction name>: metrics, ...}.

    `scale` / `size` (eval.scale, eval.size): the input is resized for inference (`inference_input`),
    the student's logits are resized back (bilinear) to the label's size and the metrics are computed
    at the label's resolution, as mmsegmentation's test pipeline does. Extra predictions (SDES's
    Ens-T) are computed from those label-sized logits and the full-resolution labels, so they go
    through the same resize. The default (scale 1, no size) scores the image as it is.
    """
    was_training = model.training
    model.eval()
    if method is not None:
        method.eval()
    sampler = D.shard_sampler(dataset) if D.is_distributed() else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=0)
    mats: dict[str, ConfusionMatrix] = {"student": ConfusionMatrix(num_classes, device)}
    progress = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), console=console,
                        disable=not show_progress, transient=True)
    with progress:
        task = progress.add_task("eval", total=len(loader))
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp) if amp else nullcontext():
                out = model(inference_input(images, scale, size))
                out = {**out, "logits": to_size(out["logits"], labels.shape[-2:])}
                extra = method.eval_predictions(out, labels) if method is not None else {}
            mats["student"].update(predict(out["logits"]), labels)
            for name, logits in extra.items():
                mats.setdefault(name, ConfusionMatrix(num_classes, device)).update(predict(logits), labels)
            progress.advance(task)
    results = {}
    for name, mat in mats.items():
        mat.all_reduce()
        results[name] = mat.compute()
    model.train(was_training)
    if method is not None:
        method.train(was_training)
    return results


class RunLock:
    """An exclusive lock per output folder: two processes never write the same run."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, show_progress: bool = True):
        self.cfg = cfg
        self.resume = resume
        self.show_progress = show_progress and D.is_main()
        self.out = Path(cfg.output.dir)
        self.ckpt_path = self.out / "checkpoints" / "last.pt"
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cudnn.benchmark = True
        self.device = pick_device(cfg.train.device)
        self.amp = amp_dtype(cfg.train.amp, self.device)
        torch.manual_seed(cfg.train.seed)

        ds_cls = DATASETS.get(cfg.data.name)
        self.num_classes = ds_cls.num_classes
        self.class_names = ds_cls.class_names
        self.train_set = build_dataset(cfg, cfg.data.train_split)
        self.eval_set = build_dataset(cfg, cfg.data.eval_split)
        if cfg.data.check:
            ensure_checked(self.train_set, self.eval_set, self.cache_dir)

        self.model = build_model(cfg.model, self.num_classes)
        self.student_params = count_params(self.model)
        self.teacher = None
        method_cls = METHODS.get(cfg.method.name)
        if method_cls.needs_teacher:
            self.teacher = load_teacher(cfg, self.num_classes, self.device)
        opts = method_cls.parse_options(cfg.method.options, self.num_classes)
        ctx = MethodContext(model=self.model, num_classes=self.num_classes, total_iters=cfg.train.iters,
                            class_pixel_counts=lambda: class_pixel_counts(self.train_set, self.cache_dir),
                            teacher=self.teacher, seed=cfg.train.seed)
        self.method = method_cls(opts, ctx)
        self.model.to(self.device)
        self.method.to(self.device)
        if cfg.train.channels_last and self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
            self.method.to(memory_format=torch.channels_last)
        params = [p for p in list(self.model.parameters()) + list(self.method.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                         weight_decay=cfg.train.weight_decay)
        self.scheduler = PolynomialLR(self.optimizer, total_iters=cfg.train.iters, power=cfg.train.poly_power)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        if cfg.train.compile:
            self.model.forward = torch.compile(self.model.forward)
        # one module holding student + method modules, so DDP synchronises expert gradients too
        self.unit = D.wrap(TrainUnit(self.model, self.method), self.device, cfg.train.sync_bn)
        self.start_iter = 0
        self.elapsed = 0.0  # training seconds, summed over resumes
        self._check_free_space()

    def _check_free_space(self) -> None:
        """Fail before training when the output disk cannot hold a checkpoint (weights + optimizer state)."""
        n = count_params(self.model) + count_params(self.method)
        need = 3 * 4 * n + 64 * 2**20  # fp32 weights + momentum + temporary copy during the atomic write, + margin
        free = shutil.disk_usage(self.out).free
        if free < need:
            raise SdesbenchError(f"output folder {self.out} has {free / 2**20:.0f} MiB free; a checkpoint needs about "
                                 f"{need / 2**20:.0f} MiB")

    @property
    def cache_dir(self) -> Path:
        env = os.environ.get("SDESBENCH_CACHE")
        return Path(env) if env else self.out / "cache"

    def _state(self, iteration: int) -> dict[str, Any]:
        return {
            "iteration": iteration,
            "model_name": self.cfg.model.name,
            "num_classes": self.num_classes,
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.identity_hash(),
            "model": self.model.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "elapsed": self.elapsed,
        }

    def _save(self, iteration: int) -> None:
        if D.is_main():
            state = self._state(iteration)
            save_checkpoint(self.ckpt_path, state)
            keep = self.cfg.train.keep_checkpoints_every
            if keep and iteration % keep == 0:  # kept for measuring along training (`sdesbench balance`)
                save_checkpoint(self.ckpt_path.with_name(f"iter_{iteration}.pt"), state)
        D.barrier()

    def _restore(self) -> None:
        state = load_checkpoint(self.ckpt_path, map_location="cpu")
        if state.get("config_hash") != self.cfg.identity_hash():
            raise CheckpointError(f"{self.ckpt_path} was written by a different configuration; "
                                  "resume with the same settings or use another --out")
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.start_iter = int(state["iteration"])
        self.elapsed = float(state["elapsed"])

    # ------------------------------------------------------------------ record
    def _record(self, status: str, iteration: int, metrics: dict[str, Any] | None = None,
                error: str | None = None) -> dict[str, Any]:
        cfg = self.cfg
        done = iteration - self._iters_at_start
        record: dict[str, Any] = {
            "status": status,
            "error": error,
            "config": cfg.to_dict(),
            "config_hash": cfg.identity_hash(),
            "model": cfg.model.name,
            "method": cfg.method.name,
            "dataset": cfg.data.name,
            "seed": cfg.train.seed,
            "iterations": iteration,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "params": self.student_params,
            "params_m": round(self.student_params / 1e6, 4),
            "pretrained": bool(getattr(self.model, "pretrained", False)),
            "wall_time_s": round(self.elapsed, 3),
            "iters_per_s": round(done / self._session_time, 4) if self._session_time > 0 and done > 0 else None,
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "device": str(self.device) if self.device.type == "cpu" else torch.cuda.get_device_name(self.device),
            "world_size": D.world_size(),
            "amp": str(self.amp).replace("torch.", "") if self.amp else "off",
            "torch_version": torch.__version__,
            "sdesbench_version": __version__,
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if metrics is not None:
            student = metrics["student"]
            record["metrics"] = {"miou": student["miou"], "pixel_acc": student["pixel_acc"]}
            record["per_class_iou"] = dict(zip(self.class_names, student["per_class_iou"]))
            record["extra_metrics"] = {k: {"miou": v["miou"], "pixel_acc": v["pixel_acc"]}
                                       for k, v in metrics.items() if k != "student"}
        if D.is_main():
            write_json(self.out / "results.json", record)
        return record

    # ------------------------------------------------------------------ loop
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def run(self) -> dict[str, Any]:
        check_writable(self.out)
        # under torchrun the ranks share the folder: rank 0 holds the lock and writes the files
        with RunLock(self.out) if D.is_main() else nullcontext():
            return self._run_locked()

    def _run_locked(self) -> dict[str, Any]:
        cfg = self.cfg
        existing = self.out / "results.json"
        if existing.is_file() and not self.resume:
            try:
                prev = json.loads(existing.read_text())
            except (OSError, json.JSONDecodeError):
                prev = {}
            if prev.get("status") == "completed":
                raise SdesbenchError(f"{self.out} already holds a completed run; choose another --out "
                                     "(nothing was overwritten)")
        self._setup()
        if self.resume and self.ckpt_path.is_file():
            self._restore()
        if D.is_main():
            write_text(self.out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self._iters_at_start = self.start_iter
        self._session_time = 0.0

        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            iteration = self._train_loop()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if self._stop_signal is not None:
            self._save(iteration)
            self._record("interrupted", iteration)
            name = signal.Signals(self._stop_signal).name
            raise Interrupted(f"{name}: stopped at iteration {iteration}, checkpoint saved in {self.ckpt_path}; "
                              "continue with --resume", self._stop_signal)

        D.broadcast_state(self.unit.module if hasattr(self.unit, "module") else self.unit)  # rank 0's BN stats
        metrics = evaluate(self.model, EvalView(self.eval_set, cfg.eval.max_images), self.num_classes, self.device,
                           cfg.eval.batch_size, method=self.method, amp=self.amp, show_progress=self.show_progress,
                           scale=cfg.eval.scale, size=cfg.eval.size)
        return self._record("completed", iteration, metrics)

    def _loader(self) -> DataLoader:
        cfg = self.cfg
        view = TrainView(self.train_set, cfg.data.crop, cfg.data.scale, cfg.data.flip)
        sampler = IterationSampler(len(view), cfg.data.batch_size, cfg.train.iters, cfg.train.seed,
                                   start_iter=self.start_iter, rank=D.rank(), world_size=D.world_size())
        cuda = self.device.type == "cuda"
        workers = cfg.data.workers
        return DataLoader(view, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=workers,
                          pin_memory=cuda, persistent_workers=cuda and workers > 0, drop_last=False,
                          prefetch_factor=4 if workers > 0 else None,
                          generator=torch.Generator())  # keeps the global RNG untouched (exact resume)

    def _train_loop(self) -> int:
        cfg = self.cfg
        total = cfg.train.iters
        iteration = self.start_iter
        if iteration >= total:
            return iteration
        self.unit.train()
        log_path = self.out / "log.jsonl"
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[terms]}"), console=console, disable=not self.show_progress)
        label = f"{cfg.method.name}/{cfg.model.name}"
        t_session = time.perf_counter()
        with progress, open(log_path, "a") if D.is_main() else nullcontext() as log:
            task = progress.add_task(label, total=total, completed=iteration, rate="", terms="")
            for images, labels in self._loader():
                t0 = time.perf_counter()
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                if cfg.train.channels_last and self.device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext():
                    teacher_out = None
                    if self.teacher is not None:
                        with torch.no_grad():
                            teacher_out = self.teacher(images)
                    terms = self.unit(images, labels, StepInfo(iteration, total), teacher_out)
                loss = sum(terms.values())
                if not D.all_true(bool(torch.isfinite(loss)), self.device):  # every rank stops together
                    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v))] or ["total"]
                    msg = (f"non-finite loss term '{bad[0]}' at iteration {iteration + 1}; the last good checkpoint "
                           f"is kept (iteration {self._last_ckpt_iter()})")
                    self._record("failed", iteration, error=msg)
                    raise NumericalFault(msg)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                iteration += 1
                dt = time.perf_counter() - t0
                self.elapsed += dt
                if iteration % cfg.train.log_every == 0 or iteration == total:
                    values = {k: round(float(v.detach()), 5) for k, v in terms.items()}
                    lr = self.optimizer.param_groups[0]["lr"]
                    if log is not None:
                        log.write(json.dumps({"iter": iteration, "lr": lr, "loss": round(float(loss.detach()), 5), **values}) + "\n")
                        log.flush()
                    progress.update(task, terms=" ".join(f"{k}={v:.4f}" for k, v in values.items()) + f" lr={lr:.2e}",
                                    rate=f"{1 / max(dt, 1e-9):.2f} it/s")
                progress.update(task, completed=iteration)
                if iteration % cfg.train.checkpoint_every == 0 or iteration == total:
                    self._save(iteration)
                if self._stop_signal is not None:
                    break
        self._session_time = time.perf_counter() - t_session
        return iteration

    def _last_ckpt_iter(self) -> int:
        if not self.ckpt_path.is_file():
            return 0
        try:
            return int(load_checkpoint(self.ckpt_path)["iteration"])
        except Exception:
            return 0


class TrainUnit(torch.nn.Module):
    """Student + method in one module: forward returns the method's loss terms."""

    def __init__(self, model: SegmentationModel, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, images, labels, step: StepInfo, teacher_out=None) -> dict[str, torch.Tensor]:
        return self.method.loss_terms(self.model(images), labels, step, teacher_out)


def random_init_unit(model_name: str, method_name: str, num_classes: int, options: dict[str, Any] | None = None,
                     teacher_model: str | None = None, total_iters: int = 1000,
                     class_pixel_counts: Callable[[], torch.Tensor] | None = None,
                     seed: int = 0) -> tuple[TrainUnit, SegmentationModel | None]:
    """Student + method (+ a frozen teacher of `teacher_model` when the method needs one), built as the
    Trainer builds them but with random weights: for measuring cost (bench, report), not accuracy.
    Without class counts every class counts the same (a class split changes which classes an
    expert owns, not its size)."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes)
    method_cls = METHODS.get(method_name)
    teacher = None
    if method_cls.needs_teacher and teacher_model:
        teacher = build_model(teacher_model, num_classes).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    opts = method_cls.parse_options(options or {}, num_classes)
    counts = class_pixel_counts or (lambda: torch.ones(num_classes, dtype=torch.long))
    ctx = MethodContext(model=model, num_classes=num_classes, total_iters=total_iters, class_pixel_counts=counts,
                        teacher=teacher, seed=seed)
    return TrainUnit(model, method_cls(opts, ctx)), teacher


def train(cfg: RunConfig, resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    return Trainer(cfg, resume=resume, show_progress=show_progress).run()

