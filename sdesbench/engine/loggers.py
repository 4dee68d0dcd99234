"""Where a run's measurements go (`output.loggers`): log.jsonl, TensorBoard, MLflow, Weights & Biases.

Every logger receives the same things, through one small interface (`Logger`):
- `open`: the run (`RunInfo`): its key (the configuration hash), its table, preset and row when `sdesbench run`
  planned it, and the resolved configuration;
- `log`: every published event (`trainer.publish`: the training scalars of each logged iteration, each periodic
  evaluation), at its iteration, as the flat scalars of `event_scalars` ("train/loss", "val/miou", ...);
- `log_final`: the final evaluation's metrics (`final_scalars`: "final/miou", ...), once the Trainer has run it
  (`after_final_evaluation`);
- `close`: how the run ended (completed, failed, interrupted).

| logger | scalars | configuration, key, table/row | final metrics | a resumed run |
|---|---|---|---|---|
| jsonl | `log.jsonl`, one line per event | `config.yaml` and `results.json` beside it | `results.json` | drops the lines after its checkpoint |
| tensorboard | `tensorboard/` event files | a text summary "run" at step 0 | scalars "final/..." at the last iteration | purges the steps after its checkpoint |
| mlflow | metrics, step = iteration | params (`section.key`), tags `sdesbench.*` | metrics "final/..." at the last iteration | reopens the same MLflow run |
| wandb | history, step = iteration | config, tags | the run's summary | reopens the same W&B run id |

MLflow writes to a file store in `<out>/mlruns` unless `MLFLOW_TRACKING_URI` names another store or a server
(MLflow 3 keeps the file store in maintenance mode behind `MLFLOW_ALLOW_FILE_STORE`, which this module sets when it
uses that store). W&B runs offline into `<out>/wandb` unless `WANDB_MODE=online` (after `wandb login`); `wandb sync
<out>/wandb/offline-run-*` uploads it later. The W&B project (and MLflow experiment) is `sdesbench-<table>` and the
group the preset, so that a table's runs at one preset group together; a run trained on its own goes to project
`sdesbench`. `WANDB_PROJECT` and `MLFLOW_EXPERIMENT_NAME` override them.

Neither MLflow nor W&B can delete what a run logged. A killed run has logged the iterations after its last
checkpoint, which the resumed run trains (and publishes) again: `loggers.json` in the run folder keeps, for each of
them, its run id and the last iteration it was sent, written after every event; a resumed run reopens the same
MLflow run / W&B run id and sends only the events after that iteration (the killed session's values stay for the
iterations in between: with a deterministic run, the same losses). A run started afresh in the folder opens new
ones (and marks the MLflow run it leaves KILLED).

A logger whose package is missing, or whose tracking server does not answer, is one line as the hooks start, before
the first step (`check`), naming the extra to install (`pip install 'sdesbench[mlflow]'`).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import yaml

from sdesbench.config import RunConfig
from sdesbench.engine import distributed as D
from sdesbench.engine.state import FinalEvaluation, HookBase, Priority, TrainerView
from sdesbench.errors import SdesbenchError
from sdesbench.identity import flatten
from sdesbench.io import append_bytes, disk_full_as_error, write_json, write_text

STATE_FILE = "loggers.json"  # the remote loggers' run ids and last iteration sent (module docstring)


def event_scalars(event: dict[str, Any]) -> dict[str, float]:
    """The scalars of an event, by name: "train/<key>" for a training scalar, "<section>/<key>/..." for the
    numbers of a section ("val/miou", "val/per_class_iou/Sky", "val/ens_t/miou"); None (an absent class, an
    unknown rate) is left out. These are TensorBoard's tags, MLflow's metric keys and W&B's history keys."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    for key, value in event.items():
        if key != "iter":
            walk(key if isinstance(value, dict) else f"train/{key}", value)
    return out


def final_scalars(final: FinalEvaluation, class_names: list[str]) -> dict[str, float]:
    """The final evaluation as scalars: "final/miou", "final/pixel_acc", "final/per_class_iou/<class>" (an absent
    class left out) for the student, "final/<prediction>/miou" and ".../pixel_acc" for each extra prediction."""
    student = final.metrics["student"]
    scores: dict[str, Any] = {"miou": student["miou"], "pixel_acc": student["pixel_acc"], "images": final.images,
                              "per_class_iou": dict(zip(class_names, student["per_class_iou"]))}
    scores.update({k: {"miou": v["miou"], "pixel_acc": v["pixel_acc"]}
                   for k, v in final.metrics.items() if k != "student"})
    return event_scalars({"final": scores})


@dataclass(frozen=True)
class RunInfo:
    """What names a run to a logger."""

    key: str  # the configuration hash (the run folder's name in a sweep)
    out: Path
    config: dict[str, Any]  # the resolved configuration
    table: str | None
    preset: str | None
    row: str | None  # "<group>/<row>" of the table, or "teacher:<model>"
    start_iter: int  # a resumed run: its checkpoint's iteration (0: a fresh run)

    @classmethod
    def of(cls, cfg: RunConfig, start_iter: int) -> "RunInfo":
        out = cfg.output
        return cls(cfg.identity_hash(), Path(out.dir), cfg.to_dict(), out.table, out.preset, out.row, start_iter)

    @property
    def name(self) -> str:
        what = self.row or f"{self.config['method']['name']}/{self.config['model']['name']}"
        return f"{what} seed {self.config['train']['seed']}"

    @property
    def project(self) -> str:
        return f"sdesbench-{self.table}" if self.table else "sdesbench"

    @property
    def tags(self) -> dict[str, str]:
        """The key and, where planned by a table, the table, preset and row."""
        tags = {"key": self.key, "table": self.table, "preset": self.preset, "row": self.row}
        return {k: v for k, v in tags.items() if v is not None}


class Logger:
    """One destination of a run's measurements (module docstring). `check` runs as the hooks start, before the
    first step: a missing package or an unreachable server is one `SdesbenchError` line.
    `state` is what a resumed run needs to continue the same logged run (`loggers.json`); None for a logger
    that rewrites its own files from the checkpoint (jsonl, TensorBoard)."""

    name: ClassVar[str]
    extra: ClassVar[str | None] = None  # the pip extra that installs its package

    def check(self, cfg: RunConfig) -> None:
        pass

    def open(self, run: RunInfo, state: dict[str, Any] | None) -> dict[str, Any] | None:
        return None

    def log(self, step: int, scalars: dict[str, float], event: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_final(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def close(self, status: str) -> None:
        pass

    def missing(self, package: str, error: BaseException) -> SdesbenchError:
        return SdesbenchError(f"output.loggers has {self.name}, which needs the {package} package "
                              f"({type(error).__name__}: {error}): pip install 'sdesbench[{self.extra}]', "
                              f"or leave {self.name} out of output.loggers")


class JsonlLogger(Logger):
    """`log.jsonl`: one line per event as published ({"iter", "lr", "loss", <terms>, "images_per_s", "iter_s",
    "data_s", "peak_memory_mb"}, or {"iter", "val": {...}}; `hooks.LogHook` says what each is). A resumed run first
    drops the lines written after its checkpoint (a killed run logged them, the resumed run logs them again); a
    fresh run starts an empty log. The configuration, key and final metrics are `config.yaml` and `results.json`
    beside it."""

    name = "jsonl"

    def open(self, run, state):
        path = run.out / "log.jsonl"
        kept = []
        if run.start_iter > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if int(json.loads(line)["iter"]) <= run.start_iter:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut by a kill: dropped
                    continue
        write_text(path, "".join(kept))
        self.path, self.file = path, open(path, "ab", buffering=0)  # unbuffered: see io.append_bytes
        return None

    def log(self, step, scalars, event):
        append_bytes(self.file, (json.dumps(event) + "\n").encode(), self.path)

    def close(self, status):
        self.file.close()


class TensorBoardLogger(Logger):
    """TensorBoard event files in `<out>/tensorboard`: the scalars of every event at its iteration, the run's key,
    table/row and configuration as a text summary "run", the final metrics as "final/..." scalars at the last
    iteration. A resumed run purges what the killed run wrote after its checkpoint (`purge_step`), as the log does.
    A full disk is one `StorageError` naming the folder: the writer's background thread fails first, and its error
    is raised again by the writer's next call in the main thread, so the thread's own traceback is not printed."""

    name = "tensorboard"

    def check(self, cfg):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as e:  # a third-party dependency, not the project's code
            raise SdesbenchError(f"output.loggers has tensorboard, which needs the tensorboard package ({e}): "
                                 "pip install tensorboard, or leave tensorboard out of output.loggers") from None

    def open(self, run, state):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = run.out / "tensorboard"
        self.thread_excepthook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread
        with disk_full_as_error(self.folder):
            self.writer = SummaryWriter(str(self.folder), purge_step=run.start_iter + 1 if run.start_iter else None)
            if not run.start_iter:
                tags = "".join(f"- {k}: {v}\n" for k, v in run.tags.items())
                self.writer.add_text("run", f"{tags}\n```yaml\n{yaml.safe_dump(run.config, sort_keys=False)}```", 0)
        return None

    def _quiet_writer_thread(self, args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":  # tensorboard's event-file writer thread
            self.thread_excepthook(args)

    def log(self, step, scalars, event):
        self.log_final(step, scalars)

    def log_final(self, step, scalars):
        if self.writer is None:
            return
        try:
            with disk_full_as_error(self.folder):
                for tag, value in scalars.items():
                    self.writer.add_scalar(tag, value, step)
        except BaseException:
            self.writer = None  # its thread has stopped: closing it would raise the same error again
            raise

    def close(self, status):
        try:
            if self.writer is not None:
                writer, self.writer = self.writer, None
                with disk_full_as_error(self.folder):
                    writer.close()
        finally:
            threading.excepthook = self.thread_excepthook


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """`os.environ` with `values` set for the block (MLflow reads its HTTP retry settings from it per request)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def mlflow_key(name: str) -> str:
    """A scalar's name as an MLflow key, which allows letters, digits, '_', '-', '.', ' ', ':' and '/' (a class
    named with another character has it replaced by '_')."""
    return re.sub(r"[^/\w.\- :]", "_", name)


class MlflowLogger(Logger):
    """MLflow through its client (`MlflowClient`; the `mlflow-skinny` package holds it and the file store): an
    experiment per table (`RunInfo.project`), a run per training run named after its row, the scalars as metrics
    with step = iteration, the configuration as params (`section.key`, lists as text), the key, table, preset and
    row as tags `sdesbench.<name>`, the final metrics as "final/..." metrics at the last iteration."""

    name, extra = "mlflow", "mlflow"

    def check(self, cfg):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:  # a third-party dependency, not the project's code
            raise self.missing("mlflow", e) from None
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path(cfg.output.dir).resolve() / "mlruns").as_uri()
        if self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if not D.is_main():
            return
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            if self.uri.startswith(("http:", "https:")):  # a server: one quick request, not MLflow's minutes of retries
                with environment(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="15"):
                    self.client.search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - MLflow's and its HTTP client's errors, as one line
            raise SdesbenchError(f"output.loggers has mlflow, and its tracking store {self.uri} does not answer "
                                 f"({type(e).__name__}: {first_line(e)}); check MLFLOW_TRACKING_URI") from None

    def open(self, run, state):
        client = self.client
        if state and run.start_iter > 0:
            try:  # a resumed run continues its MLflow run
                client.update_run(state["run_id"], status="RUNNING")
                self.run_id = state["run_id"]
                return {"run_id": self.run_id}
            except Exception:  # noqa: BLE001 - not in this store (MLFLOW_TRACKING_URI changed): a new run
                state = None
        if state:  # a fresh run in a folder that held another: the MLflow run it leaves is marked as such
            try:
                client.set_terminated(state["run_id"], status="KILLED")
            except Exception:  # noqa: BLE001 - not in this store: nothing to mark
                pass
        self.run_id = client.create_run(self.experiment(run.project), run_name=run.name,
                                        tags={f"sdesbench.{k}": v for k, v in run.tags.items()}).info.run_id
        from mlflow.entities import Param

        params = [Param(mlflow_key(k), str(v)[:6000]) for k, v in flatten(run.config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit for params
            client.log_batch(self.run_id, params=params[i:i + 100])
        return {"run_id": self.run_id}

    def experiment(self, project: str) -> str:
        """The id of the experiment runs go to (`MLFLOW_EXPERIMENT_NAME`, else the project), created if new."""
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or project
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 - created meanwhile by a run beside this one
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, step, scalars, event):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, now, step) for k, v in scalars.items()])

    def log_final(self, step, scalars):
        self.log(step, scalars, {})

    def close(self, status):
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


class WandbLogger(Logger):
    """Weights & Biases: a run per training run in project `RunInfo.project`, group = the preset, named after its
    row, the scalars as history with step = iteration, the resolved configuration (and `run_key`) as its config,
    the key, table and preset as tags, the final metrics in its summary. Offline (files in `<out>/wandb`) unless
    `WANDB_MODE` says otherwise; online, the credentials of `wandb login` are checked before training."""

    name, extra = "wandb", "wandb"

    def check(self, cfg):
        try:
            import wandb
        except ImportError as e:  # a third-party dependency, not the project's code
            raise self.missing("wandb", e) from None
        self.mode = os.environ.get("WANDB_MODE") or "offline"
        if self.mode == "online" and D.is_main():
            try:
                ok = wandb.login(prompt=False, verify=True)
            except Exception as e:  # noqa: BLE001 - wandb's errors (authentication, network) as one line
                raise SdesbenchError(f"output.loggers has wandb with WANDB_MODE=online, and W&B does not accept "
                                     f"the login ({type(e).__name__}: {first_line(e)}); run `wandb login` or unset "
                                     "WANDB_MODE to log offline") from None
            if not ok:
                raise SdesbenchError("output.loggers has wandb with WANDB_MODE=online, and no W&B login is set up: "
                                     "run `wandb login`, or unset WANDB_MODE to log offline")

    def open(self, run, state):
        import wandb

        resumed = bool(state) and run.start_iter > 0
        run_id = state["run_id"] if resumed else uuid.uuid4().hex[:12]
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or run.project, group=run.preset, name=run.name, id=run_id,
                resume="allow" if resumed else None, dir=str(run.out), mode=self.mode,
                config={**run.config, "run_key": run.key}, tags=[v[:64] for v in run.tags.values()],
                settings=wandb.Settings(console="off", silent=True))
        except Exception as e:  # noqa: BLE001 - wandb's errors (network, server) as one line
            raise SdesbenchError(f"wandb could not start its run ({type(e).__name__}: {first_line(e)})") from None
        return {"run_id": run_id}

    def log(self, step, scalars, event):
        self.run.log(scalars, step=step)

    def log_final(self, step, scalars):
        self.run.summary.update(scalars)

    def close(self, status):
        self.run.finish(exit_code={"completed": 0, "interrupted": 130}.get(status, 1))


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


LOGGERS: dict[str, type[Logger]] = {c.name: c for c in (JsonlLogger, TensorBoardLogger, MlflowLogger, WandbLogger)}


class LoggersHook(HookBase):
    """Every published event, and the final evaluation the Trainer observes hooks with, to the loggers of
    `output.loggers` (rank 0's; module docstring). It checks their packages and servers first (before the first
    step: a failure is one line, and the hooks after it never start), opens them before anything publishes and
    closes them after everything else: VERY_HIGH, as `LogHook`, which publishes."""

    priority = Priority.VERY_HIGH

    def __init__(self) -> None:
        self.opened: list[Logger] = []
        self.sent: dict[str, dict[str, Any]] = {}

    def before_train(self, trainer: TrainerView) -> None:
        loggers = [LOGGERS[name]() for name in dict.fromkeys(trainer.cfg.output.loggers)]
        for logger in loggers:  # on every rank: a package missing on one is missing on all, and all stop
            logger.check(trainer.cfg)
        if not D.is_main():
            return
        run = RunInfo.of(trainer.cfg, trainer.state.start_iter)
        self.state_path = run.out / STATE_FILE
        previous = self.read_state() if self.state_path.is_file() else {}
        try:
            for logger in loggers:
                state = logger.open(run, previous.get(logger.name))
                self.opened.append(logger)
                if state is not None:
                    before = previous.get(logger.name) or {}
                    resumed = run.start_iter > 0 and before.get("run_id") == state["run_id"]
                    self.sent[logger.name] = {**state, "last": before.get("last", [0, 0]) if resumed else [0, 0]}
            if self.sent:
                write_json(self.state_path, self.sent)
        except BaseException:  # this hook's `after_train` will not run (it did not start): close what it opened
            self.after_train(trainer)
            raise

    def read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):  # unreadable: the runs it named cannot be continued, new ones are opened
            return {}
        return state if isinstance(state, dict) else {}

    def on_event(self, trainer: TrainerView, event: dict[str, Any]) -> None:
        step, scalars = int(event["iter"]), event_scalars(event)
        # events come in this order: by iteration, and at one iteration the training scalars before an evaluation
        order = [step, 0 if "loss" in event else 1]
        changed = False
        for logger in self.opened:
            sent = self.sent.get(logger.name)
            if sent is not None and order <= sent["last"]:
                continue  # a resumed run: this logger has this event from the session that was killed
            logger.log(step, scalars, event)
            if sent is not None:
                sent["last"], changed = order, True
        if changed:
            write_json(self.state_path, self.sent)

    def after_final_evaluation(self, trainer: TrainerView) -> None:
        final = final_scalars(trainer.state.final, trainer.class_names)
        for logger in self.opened:
            logger.log_final(trainer.state.iteration, final)

    def after_train(self, trainer: TrainerView) -> None:
        state = trainer.state
        status = "completed" if state.final is not None else "interrupted" if state.stop_signal is not None \
            else "failed"
        error: BaseException | None = None
        for logger in reversed(self.opened):
            try:
                logger.close(status)
            except BaseException as e:  # noqa: BLE001 - every logger is closed; the first error is raised after
                error = error or e
        self.opened = []
        if error is not None:
            raise error
