"""The rows of a table as measured: each row's runs over seeds, read from their records (`collect`), with the
metric values of the checkpoint the report shows and the status of every run that has no number. What is
computed from them (the gains against the Student row: `report/gains.py`) and how they are printed
(`report/tables.py`, `report/latex.py`) live elsewhere."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sdesbench.engine.record import RunRecord, Scores, best_evaluation
from sdesbench.errors import StorageError
from sdesbench.experiments.plan import PlannedRun
from sdesbench.report.columns import RECORD_KEY, ExtraEvaluation

Checkpoint = Literal["last", "best"]
# why a completed run lacks a metric: its record predates the metric (mAcc: schema 5, mDice / mFscore: schema 6)
RECORDED_SINCE = {"macc": " (recorded before sdesbench recorded mAcc)",
                  "mdice": " (recorded before sdesbench recorded mDice: record schema 6)",
                  "mfscore": " (recorded before sdesbench recorded mFscore: record schema 6)"}


@dataclass
class RowResults:
    """One table row over seeds: the values per metric, the statuses, the completed records."""

    plan: PlannedRun
    runs: list[PlannedRun]
    values: dict[str, list[float]]
    status: list[str] = field(default_factory=list)
    records: list[tuple[PlannedRun, RunRecord]] = field(default_factory=list)

    def status_text(self) -> str:
        parts = sorted(set(self.status))
        text = "; ".join(parts) if parts else "ok"
        if parts and self.records:
            text = f"{len(self.records)} completed; {text}"
        return text


def extra_key(metric: str) -> str:
    """`RowResults.values` key of a metric of the extra evaluation (`ExtraEvaluation`)."""
    return f"extra:{metric}"


def checkpoint_scores(rec: RunRecord, source: str, checkpoint: Checkpoint) -> Scores | None:
    """The record's scores of `source` at the final iteration (`last`) or at its best periodic evaluation (`best`)."""
    if checkpoint == "last":
        return rec.scores(source)
    best = best_evaluation(rec.history)
    return best.scores(source) if best is not None else None


def collect(plans: list[PlannedRun], metrics: tuple[str, ...], extra: ExtraEvaluation | None = None,
            checkpoint: Checkpoint = "last") -> list[RowResults]:
    """One entry per table row (teachers left out), in plan order, with the `checkpoint`'s numbers; with
    `extra`, each metric of the extra evaluation too (values under `extra_key(metric)`)."""
    by_key: dict[str, list[PlannedRun]] = {}
    for p in plans:
        if p.is_row:
            by_key.setdefault(p.key, []).append(p)
    rows = []
    for runs in by_key.values():
        entry = RowResults(runs[0], runs, {m: [] for m in metrics} | ({extra_key(m): [] for m in metrics} if extra else {}))
        for p in runs:
            if p.skipped:
                entry.status.append(f"skipped: {p.skipped}")
                continue
            try:
                rec = p.record()
            except StorageError as e:
                entry.status.append(f"unreadable: {e}")
                continue
            if rec is None and p.stale is not None:  # recorded under other defaults: never shown as current
                entry.status.append(f"{p.stale.describe()}; the old record is kept in {p.stale.folder}")
            elif rec is None:
                entry.status.append("missing: not run yet")
            elif not rec.completed:
                entry.status.append(f"{rec.status}: {rec.error or 'no error recorded'}")
            else:
                entry.records.append((p, rec))
                scores = checkpoint_scores(rec, p.metric_source, checkpoint)
                for m in metrics:
                    v = getattr(scores, RECORD_KEY.get(m, m), None) if scores else None
                    if v is None and checkpoint == "best" and not rec.history:
                        entry.status.append(f"missing: no periodic evaluation (eval.every) in {p.out}/results.json")
                    elif v is None:
                        before = RECORDED_SINCE.get(m, "")
                        where = " at the best periodic evaluation" if checkpoint == "best" else ""
                        entry.status.append(f"missing: no {p.metric_source} {m}{where} in {p.out}/results.json{before}")
                    else:
                        entry.values[m].append(100.0 * v)
                    if extra is not None:
                        value, why = extra.value(p, rec, m, checkpoint)
                        entry.values[extra_key(m)] += [value] if value is not None else []
                        entry.status += [why] if why else []
        entry.status = list(dict.fromkeys(entry.status))  # one line per reason (the extra's may repeat per metric)
        rows.append(entry)
    return rows
