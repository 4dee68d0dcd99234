"""Whether a run may start in its folder, and what it continues or brings back: the policy for a folder
that already holds a run.

Starting a run in a folder that already holds one: a completed run is never overwritten; a checkpoint
(an interrupted, failed or killed run) is continued only with `resume` ("required" from
`sdesbench train --resume`, "auto" from `sdesbench run`), never silently retrained from zero;
`--resume` into a folder without a checkpoint says there is nothing to resume. A process group that
torchrun restarted after losing a rank (`--max-restarts`) continues the folder's checkpoint by itself
("restart", which the Trainer sets from `TORCHELASTIC_RESTART_COUNT`: as "auto", but a completed run is still
never overwritten, and only a checkpoint of the same configuration is continued); a rank lost for good fails
the run with one line (docs/performance.md, "Faults under torchrun").

Bringing back the weights of a recorded run ("restore" from `sdesbench train --restore-weights`, or
"auto" when `sdesbench run` needs a teacher whose record is here and whose checkpoint is not: a fresh
clone keeps records in git, never checkpoints): the run is trained again from its configuration, its
record set aside as `results.previous.json` first (so an interruption loses nothing). At the end the
new metrics are compared with the recorded ones, and one line says whether they are the same; the
record always describes the weights in the folder, and the previous one is kept when they differ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from sdesbench.console import err as console
from sdesbench.engine import distributed as D
from sdesbench.engine.record import RunRecord, read_record, read_record_file
from sdesbench.errors import SdesbenchError, StorageError
from sdesbench.io import write_json

Resume = Literal["never", "auto", "required", "restore", "restart"]
PREVIOUS_RECORD = "results.previous.json"  # a recorded run's record while its weights are trained again


class RunFolder:
    """The run's folder as this session finds it (module docstring). `previous`: the record whose weights are
    being brought back, once `check` has decided."""

    def __init__(self, out: Path, checkpoint: Path, resume: Resume):
        self.out, self.checkpoint, self.resume = out, checkpoint, resume
        self.previous: RunRecord | None = None

    @property
    def resumes(self) -> bool:
        """This session continues the checkpoint in the folder."""
        return self.resume != "never" and self.checkpoint.is_file()

    def check(self, config_hash: str) -> None:
        """Refuse in one line a start the folder does not allow; note the record to bring back, if any."""
        out, resume = self.out, self.resume
        try:
            previous = read_record(out)
        except StorageError:
            previous = None  # an unreadable record is replaced; the checkpoint rules below still apply
        has_ckpt = self.checkpoint.is_file()
        ckpt = self.checkpoint.relative_to(out)
        if resume == "restore" and has_ckpt:
            raise SdesbenchError(f"{out} has its checkpoint ({ckpt}); there are no weights to bring back "
                                 "(nothing was changed)")
        if resume == "restore" and not (previous is not None and previous.completed):
            raise SdesbenchError(f"nothing to restore in {out}: it holds no completed run's record; train it "
                                 "without --restore-weights")
        if resume == "restore" and previous.config_hash != config_hash:
            raise SdesbenchError(f"{out}: its record was made with another configuration than the one given "
                                 f"(hash {previous.config_hash}, given {config_hash}); restore it with "
                                 f"--config {out / 'config.yaml'}")
        if previous is not None and previous.completed and resume in ("never", "restart"):
            raise SdesbenchError(f"{out} already holds a completed run; choose another --out "
                                 "(nothing was overwritten)")
        if resume == "never" and has_ckpt:
            where = f"{previous.status} at iteration {previous.iterations}" if previous else "a checkpoint is there"
            raise SdesbenchError(f"{out}: {where}: add --resume to continue, or choose another --out "
                                 "(nothing was overwritten)")
        if resume == "required" and not has_ckpt:
            raise SdesbenchError(f"nothing to resume in {out} (no {ckpt}); run without --resume to start fresh")
        if previous is not None and previous.completed and not has_ckpt:  # "auto" or "restore": bring back weights
            self.previous = previous
        elif (out / PREVIOUS_RECORD).is_file() and has_ckpt:  # an interrupted restoration, resumed
            try:
                self.previous = read_record_file(out / PREVIOUS_RECORD)
            except StorageError:
                self.previous = None

    def set_previous_aside(self) -> None:
        if self.previous is not None and D.is_main() and not (self.out / PREVIOUS_RECORD).is_file():
            write_json(self.out / PREVIOUS_RECORD, self.previous.to_dict())

    def compare_with_previous(self, record: RunRecord) -> None:
        """One line: whether the weights brought back score what their record said (module docstring)."""
        if self.previous is None or not D.is_main():
            return
        before, after = self.previous, record
        same = (before.metrics == after.metrics and before.per_class_iou == after.per_class_iou
                and before.extra_metrics == after.extra_metrics)
        if same:
            (self.out / PREVIOUS_RECORD).unlink(missing_ok=True)
            console.print(f"restored {self.out}: trained again, it reproduces its record exactly "
                          f"(mIoU {100 * after.metrics.miou:.2f})", soft_wrap=True)
            return
        was = f"{100 * before.metrics.miou:.2f}" if before.metrics else "none"
        console.print(f"[yellow]warning[/yellow]: {self.out} trained again to bring back its weights does not "
                      f"reproduce its record: mIoU {100 * after.metrics.miou:.2f}, recorded {was}; the record now "
                      f"describes the new weights, the old one is kept as {self.out / PREVIOUS_RECORD}", soft_wrap=True)
