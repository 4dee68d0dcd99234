"""The report's size and cost columns: Params / FLOPs of each row's network (the spec's `profile:`
setting: class count and input size of the paper's figures) and training cost from the run records."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sdesbench.engine.record import RunRecord
from sdesbench.experiments.plan import PlannedRun
from sdesbench.experiments.spec import Spec
from sdesbench.measure.costs import CostCache, cached_profile, ensemble_profile, train_flops_ratio
from sdesbench.report.numbers import fmt


class SizeColumns:
    """Params / FLOPs of a row's network at the paper's input size, as `sdesbench profile` counts them.

    A row that reports another prediction than the student's (Ens-T) is sized as that predictor: the
    student plus the method's expert decoders, from the row's run configuration.
    """

    def __init__(self, spec: Spec, results: Path):
        self.profile = spec.profile
        self.columns = list(spec.profile.columns) if spec.profile else []
        self.cache = CostCache(results)
        self.notes: set[str] = set()

    def cells(self, plan: PlannedRun) -> dict[str, Any]:
        if not self.columns:
            return {}
        group, row = plan.group_spec, plan.row_spec
        paper_params = row.params_m if row and row.params_m is not None else (group.params_m if group else None)
        paper_flops = row.gflops if row and row.gflops is not None else (group.gflops if group else None)
        nc, hw = self.profile.num_classes, list(self.profile.input_hw)
        if plan.metric_source == "student":
            prof: dict[str, Any] | None = cached_profile(self.cache, plan.model, nc, hw)
        elif plan.cfg is not None:
            key = f"ensemble:{plan.cfg.model.name}:{plan.cfg.method.name}:{sorted(plan.cfg.method.options.items())}"
            prof = self.cache.get(f"{key}:{nc}:{hw}", lambda: ensemble_profile(plan.cfg, nc, hw))
            self.notes.add(f"{plan.row}: the student plus the method's expert decoders, profiled like a network.")
        else:
            prof = None
        out: dict[str, Any] = {}
        if "params" in self.columns:
            out["Params (M)"] = f"{prof['params_m']:.2f}" if prof else "—"
            out["paper Params"] = f"{paper_params:.2f}" if paper_params is not None else "—"
        if "flops" in self.columns:
            out["FLOPs (G)"] = f"{prof['gflops']:.2f}" if prof and prof.get("gflops") is not None else "—"
            out["paper FLOPs"] = f"{paper_flops:.2f}" if paper_flops is not None else "—"
        return out


def cost_cells(records: list[tuple[PlannedRun, RunRecord]], cache: CostCache) -> dict[str, Any]:
    """Seconds per iteration, peak memory and training FLOPs relative to the student."""
    if not records:
        return {"s/iter": "—", "peak MB": "—", "train FLOPs ×": "—"}
    per_iter = [r.wall_time_s / r.iterations for _, r in records if r.iterations]
    peak = [r.peak_memory_mb for _, r in records if r.peak_memory_mb is not None]
    ratio = train_flops_ratio(records[0][0].cfg, cache)
    return {"s/iter": fmt(per_iter, 3) or "—", "peak MB": fmt(peak, 0) or "—", "train FLOPs ×": f"{ratio:.2f}"}
