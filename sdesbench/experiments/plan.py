"""A table's runs: expanding a spec at a preset and seeds into planned runs, and the one rule that orders them.

`Sweep` names what a command works on (table, preset, seeds, results folder, `--set` overrides);
`expand` makes one `PlannedRun` per (row, seed), plus one teacher run per distinct teacher and one stage run
per distinct stage (a method's `stage`, e.g. MasKD's stage 1), placed before the runs that need them. With
`--compute-matched`, each group also gets Students of equal compute (`plan_compute_matched`). Each
run names what it needs as typed `Dependency`s (kind `teacher`, `stage` or `compute-matched`).

Order (docs/performance.md, "One scheduler"): `readiness` is the rule every launcher follows, written once
here: a run starts when every run it depends on has completed, never when one of them failed or was itself
blocked, and waits otherwise. `Schedule` applies it to a sweep's runs in plan order (the local launchers, one
slot or several, `bench`'s wall-time estimate `makespan`), and `launch_order` is the order one slot would
start them in, which the Slurm launcher submits in, each job `afterok` on the jobs of its dependencies. Run folders are keyed by the configuration hash
(`results/runs/<dataset>/<model>/<method>/<hash>`), so identical runs are done once (`Ens-T` is read
from the `Ours` run, a teacher is shared by every student that names it) and a finished run is
never redone. A row whose configuration is rejected (e.g. more experts than classes) is still
planned, with the protocol it would use and the reason it is skipped, so `--dry-run` and the
report show it as skipped, never as a number.
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, Literal, Sequence, TypeVar

from sdesbench.config import RunConfig, apply_overrides, merge, method_section, parse_config
from sdesbench.identity import identity_changes
from sdesbench.engine.configure import build_config
from sdesbench.engine.cost import CostCache, cached_step_flops
from sdesbench.engine.record import RunRecord, read_record
from sdesbench.errors import ConfigError, StorageError
from sdesbench.experiments.resolve import resolve
from sdesbench.experiments.spec import Group, Row, Spec, load_spec, spec_name
from sdesbench.methods import METHODS
from sdesbench.methods.base import StageRun

# method option -> protocol column shown by `--dry-run` and in reports
PROTOCOL_OPTIONS = {"n_experts": "N", "expert": "expert"}
# a method's temperatures and loss weights, found by their names in its resolved options (`--dry-run`)
TEMPERATURE_NAMES = ("tau", "temperature")
WEIGHT_NAMES = ("weight", "alpha", "beta")


def temperatures_and_weights(options: dict[str, Any]) -> tuple[str, str]:
    """('tau=5', 'alpha=0.5 beta=100') from resolved method options: every option named like a temperature
    (`tau`, `kd_temperature`, `cwd_tau`, ...) and every loss weight (`*_weight`, `alpha`, `beta`; the aux
    head's `aux_weight` applies only to models with one and is left out)."""
    def named(words: tuple[str, ...]) -> str:
        return " ".join(f"{k}={v:g}" for k, v in options.items() if isinstance(v, (int, float))
                        and not isinstance(v, bool) and k != "aux_weight"
                        and any(k == w or k.endswith(f"_{w}") for w in words))
    return named(TEMPERATURE_NAMES), named(WEIGHT_NAMES)
# `run --compute-matched`: a Student trained for as long as a group's KD rows cost, by counted training FLOPs
# (deterministic, planned up front) or by the rows' measured step time (planned once their records exist)
ComputeMatch = Literal["flops", "time"]
COMPUTE_MATCHES: tuple[str, ...] = ComputeMatch.__args__
COST_CLASS_STEP = 0.05  # one compute-matched Student per cost class: the ratio to the Student rounded to 5%
# the teacher of a `teacher: true` row ("another pre-trained student") gets its own seed, derived from the
# row's: another training run, not the row's own baseline (docs/tables.md)
TEACHER_SEED_OFFSET = 1000


@dataclass(frozen=True)
class StaleRecord:
    """A completed record of the same request (the same spec row and settings) made under other resolved
    settings: a default changed since (`method.p: 1.0 -> 2.0`). It is kept, never shown as current."""

    folder: Path
    changes: list[tuple[str, Any, Any]]

    def describe(self, most: int = 3) -> str:
        def short(v: Any) -> str:
            text = "absent" if v is None else str(v)
            return text if len(text) <= 40 else "..." + text[-37:]

        def part(k: str, a: Any, b: Any) -> str:
            if k.startswith("plugin_sha256."):  # other plugin source: the plugin and its sha256 (12 hex digits)
                return f"plugin {k[len('plugin_sha256.'):]}: {short(a and a[:12])} -> {short(b and b[:12])}"
            return f"{k.replace('method.options.', 'method.')}: {short(a)} -> {short(b)}"

        parts = [part(k, a, b) for k, a, b in self.changes]
        more = f", and {len(parts) - most} more" if len(parts) > most else ""
        return "stale (" + ", ".join(parts[:most]) + more + ")"


@dataclass(frozen=True)
class Sweep:
    """What `run`, `ablate` and `report` work on: a table at a preset, over seeds, in a results folder,
    with the `--set` overrides the runs are made with (they are part of each run's hash)."""

    table: str  # a table name (`sdesbench list tables`) or the path of a spec file
    preset: str = "smoke"
    seeds: tuple[int, ...] = (0,)
    results: Path = Path("results")
    overrides: tuple[str, ...] = ()
    compute_matched: ComputeMatch | None = None  # also a Student per group and cost class (`--compute-matched`)

    def __post_init__(self) -> None:
        if self.compute_matched not in (None, *COMPUTE_MATCHES):
            raise ConfigError(f"--compute-matched {self.compute_matched!r}: choose {' or '.join(COMPUTE_MATCHES)}")

    def spec(self) -> Spec:
        return load_spec(self.table)

    def plans(self, spec: Spec | None = None) -> list["PlannedRun"]:
        return expand(spec or self.spec(), self)

    @property
    def name(self) -> str:
        """The table's name: what its outputs are filed under (the file's stem for a spec path)."""
        return spec_name(self.table)

    @property
    def title(self) -> str:
        return f"{self.name} ({self.preset})"

    def command(self, verb: str, *extra: str) -> str:
        """The command line that works on this sweep (`verb` = run, report, ...): what advice prints."""
        words = ["sdesbench", verb, shlex.quote(self.table), "--preset", self.preset]
        if self.seeds != (0,):
            words += ["--seeds", ",".join(map(str, self.seeds))]
        if Path(self.results) != Path("results"):
            words += ["--results", shlex.quote(str(self.results))]
        for o in self.overrides:
            words += ["--set", shlex.quote(o)]
        if self.compute_matched:
            words += ["--compute-matched", self.compute_matched]
        return " ".join(words + list(extra))

    def with_table(self, table: str) -> "Sweep":
        return dataclasses.replace(self, table=table)


# what a run needs of another: its teacher's checkpoint; a stage run's artefact (a method's `StageRun`, MasKD's
# tokens); the KD rows (and the plain Student) whose measured step time a compute-matched Student run is trained
# for (`run --compute-matched time`; by FLOPs it needs nothing: the count is deterministic)
DependencyKind = Literal["teacher", "stage", "compute-matched"]
DEPENDENCY_KINDS: tuple[str, ...] = DependencyKind.__args__
Role = Literal["row", "teacher", "stage"]  # a table row, or a run that only serves rows


@dataclass(frozen=True)
class Dependency:
    """A run that must have completed before the dependant starts: its kind and its run folder."""

    kind: DependencyKind
    folder: str

    def __post_init__(self) -> None:
        if self.kind not in DEPENDENCY_KINDS:
            raise ConfigError(f"unknown dependency kind {self.kind!r}; choose {', '.join(DEPENDENCY_KINDS)}")

    def describe(self) -> str:
        """`teacher: <dataset>/<model>/<method>/<hash>` (the folder below `runs/`), for `--dry-run`."""
        return f"{self.kind}: {self.folder.split('/runs/')[-1]}"


@dataclass
class PlannedRun:
    key: str  # "<group>/<row>", "teacher:<model>" or "stage:<method>:<group>"
    group: str
    row: str
    seed: int
    cfg: RunConfig | None
    paper: dict[str, float] = field(default_factory=dict)
    metric_source: str = "student"  # which evaluated prediction this row reports (student | ens_t)
    dependencies: list[Dependency] = field(default_factory=list)  # runs that must complete first
    skipped: str | None = None  # reason the row cannot run
    role: Role = "row"
    needs_weights: bool = False  # done only with its checkpoint (a teacher or stage run that a run to train loads;
    # every run under --restore-weights)
    model: str = ""
    method: str = "student"
    protocol: dict[str, Any] = field(default_factory=dict)  # iters, crop, batch, lr, splits, tau, N, expert, teacher
    show: dict[str, Any] = field(default_factory=dict)  # extra display columns of the paper's table
    group_spec: Group | None = None
    row_spec: Row | None = None
    stale: StaleRecord | None = None  # an older record of this request under other resolved settings
    # `--compute-matched`: a KD row's cost class (its training cost over its group's Student's, rounded to 5%), and
    # on a compute-matched Student run the class it is trained for
    cost_class: float | None = None
    matches: float | None = None

    @property
    def out(self) -> Path | None:
        return Path(self.cfg.output.dir) if self.cfg else None

    @property
    def is_teacher(self) -> bool:
        return self.role == "teacher"

    @property
    def is_row(self) -> bool:
        """A row of the table (not a teacher or a stage run, which only serve rows)."""
        return self.role == "row"

    @property
    def depends_on(self) -> list[str]:
        """The run folders of its dependencies, every kind."""
        return [d.folder for d in self.dependencies]

    def needs(self, kind: DependencyKind) -> list[str]:
        """The run folders of its dependencies of one kind."""
        return [d.folder for d in self.dependencies if d.kind == kind]

    def record(self) -> RunRecord | None:
        return read_record(self.out)

    def recorded(self) -> bool:
        """Whether the folder holds this configuration's completed record."""
        try:
            rec = self.record()
        except StorageError:
            return False
        return bool(rec and rec.completed and rec.config_hash == self.cfg.identity_hash())

    def done(self) -> bool:
        """Finished, with what other runs need of it: a teacher's record is not enough without its weights
        (a fresh clone has the records of git, not the checkpoints)."""
        return self.recorded() and (not self.needs_weights or has_weights(self.out))

    def status(self) -> str:
        """The `--dry-run` status: skipped (why), done, to run (again, when a stale record of it exists),
        or to train again for its weights."""
        if self.cfg is None:
            return f"skipped: {self.skipped}"
        if self.done():
            return "done"
        if self.recorded():
            return "recorded, no checkpoint: trained again for its weights"
        return f"{self.stale.describe()}: to run" if self.stale else "to run"


def checkpoint_of(folder: str | Path) -> Path:
    return Path(folder) / "checkpoints" / "last.pt"


def has_weights(folder: str | Path) -> bool:
    return checkpoint_of(folder).is_file()


def dependency_finished(folder: str | Path) -> bool:
    """A run other runs depend on (a teacher) is finished when its record says completed and its
    checkpoint, what they load, is there."""
    try:
        rec = read_record(folder)
    except StorageError:
        return False
    return rec is not None and rec.completed and has_weights(folder)


# ----------------------------------------------------------------------------- the one scheduling rule

RunState = Literal["waiting", "running", "completed", "failed", "blocked"]
Readiness = Literal["ready", "waiting", "blocked"]
T = TypeVar("T")


def readiness(dependency_states: Iterable[RunState]) -> Readiness:
    """The rule every launcher follows: a run is ready when every run it depends on has completed; it is blocked
    (it never starts) when one of them failed or was itself blocked; otherwise it waits."""
    states = list(dependency_states)
    if any(s in ("failed", "blocked") for s in states):
        return "blocked"
    return "ready" if all(s == "completed" for s in states) else "waiting"


def outcome_state(status: str) -> RunState:
    """How a run's ending counts for its dependants: `completed` only when its record says so; any other
    ending (failed, crashed, stopped by a signal, left to the process that holds its lock) is `failed`,
    and its dependants are blocked."""
    return "completed" if status == "completed" else "failed"


class Schedule(Generic[T]):
    """A sweep's runs still to do, in plan order, under `readiness`: `take` gives the first ready run (a slot
    is free) and the runs found blocked, `finish` records how a run ended. The local launchers (one slot is
    the sequential launcher), `launch_order` (Slurm) and `makespan` (bench) all step through one of these.

    `key` names a run (its folder), `deps` the keys it depends on; a dependency that is not among the runs
    is another sweep's or an earlier one's: completed when `finished` says so (a teacher with its record and
    checkpoint), failed otherwise."""

    def __init__(self, runs: Iterable[T], key: Callable[[T], str] = lambda r: str(r.out),
                 deps: Callable[[T], Sequence[str]] = lambda r: r.depends_on,
                 finished: Callable[[str], bool] | None = None) -> None:
        self.queue: list[T] = list(runs)
        self.key, self.deps = key, deps
        self.finished = finished or dependency_finished
        self.states: dict[str, RunState] = {key(r): "waiting" for r in self.queue}
        self.outside: dict[str, RunState] = {}

    def state(self, folder: str) -> RunState:
        if folder in self.states:
            return self.states[folder]
        if folder not in self.outside:  # read once: a run outside the sweep does not change under it
            self.outside[folder] = "completed" if self.finished(folder) else "failed"
        return self.outside[folder]

    def readiness(self, run: T) -> Readiness:
        return readiness(self.state(d) for d in self.deps(run))

    def take(self) -> tuple[T | None, list[T]]:
        """(the first run in plan order that is ready, now `running` and out of the queue, or None; the runs
        found blocked, out of the queue: a blocked run blocks its own dependants in turn)."""
        blocked: list[T] = []
        while True:
            newly = [r for r in self.queue if self.readiness(r) == "blocked"]
            if not newly:
                break
            for r in newly:
                self.queue.remove(r)
                self.states[self.key(r)] = "blocked"
            blocked += newly
        for i, r in enumerate(self.queue):
            if self.readiness(r) == "ready":
                self.states[self.key(r)] = "running"
                return self.queue.pop(i), blocked
        return None, blocked

    def finish(self, run: T, status: str) -> RunState:
        state = self.states[self.key(run)] = outcome_state(status)
        return state


def launch_order(runs: Sequence["PlannedRun"]) -> list["PlannedRun"]:
    """The runs in the order one slot starts them when every run completes: each after what it depends on.
    A dependency neither planned nor finished, or a cycle, is a ConfigError naming the run."""
    schedule = Schedule(runs)
    order: list[PlannedRun] = []
    while True:
        run, blocked = schedule.take()
        if blocked:
            missing = next(d for d in blocked[0].depends_on if schedule.state(d) != "completed")
            raise ConfigError(f"run {blocked[0].key} needs {missing}, which is neither finished nor planned")
        if run is None:
            break
        schedule.finish(run, "completed")
        order.append(run)
    if schedule.queue:
        raise ConfigError(f"run {schedule.queue[0].key} depends on itself through "
                          + " -> ".join(r.key for r in schedule.queue))
    return order


def makespan(runs: Sequence[T], durations: Sequence[float], slots: int, key: Callable[[T], str] = lambda r: str(r.out),
             deps: Callable[[T], Sequence[str]] = lambda r: r.depends_on) -> float:
    """Wall time of `runs` taking `durations` on `slots` slots, scheduled by `Schedule` as the local launchers
    schedule them, none failing (a dependency outside `runs` counts as done)."""
    schedule = Schedule(runs, key, deps, finished=lambda _: True)
    duration = {key(r): d for r, d in zip(runs, durations)}
    running: list[tuple[float, int, T]] = []  # (end time, tie-break, run)
    free, now, n = slots, 0.0, 0
    while schedule.queue or running:
        while free:
            run, blocked = schedule.take()
            if blocked:
                raise ConfigError(f"{key(blocked[0])} depends on a run that cannot complete")
            if run is None:
                break
            heapq.heappush(running, (now + duration[key(run)], n, run))
            free, n = free - 1, n + 1
        if not running:
            raise ConfigError(f"{key(schedule.queue[0])} depends on itself")
        now, _, run = heapq.heappop(running)
        schedule.finish(run, "completed")
        free += 1
    return now


def run_dir(results: Path, cfg: RunConfig) -> Path:
    # a family model name (`deeplabv3:timm/resnet18`) stays one folder: its '/' becomes '-', which no
    # registered or timm name contains
    model = cfg.model.name.replace("/", "-")
    return Path(results) / "runs" / cfg.data.name / model / cfg.method.name / cfg.identity_hash()


def protocol_of(data: dict[str, Any], overrides: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """The protocol a run would use, read from its settings (so skipped rows show it too)."""
    d = dict(data)
    if "method" in d:
        d["method"] = method_section(d["method"])
    try:
        d = apply_overrides(d, list(overrides))
    except ConfigError:
        pass  # the run itself reports a bad --set
    train, dat = d.get("train", {}), d.get("data", {})
    meth = dict((d.get("method") or {}).get("options", {}))
    crop = dat.get("crop", [64, 64])
    proto = {"iters": train.get("iters", 300), "crop": crop if isinstance(crop, list) else [crop, crop],
             "batch": dat.get("batch_size", 8), "lr": train.get("lr", 0.01), "dataset": dat.get("name", "tiny"),
             "train_split": dat.get("train_split", "train"), "eval_split": dat.get("eval_split", "val")}
    for opt, col in PROTOCOL_OPTIONS.items():
        if opt in meth:
            proto[col] = meth[opt]
    if (d.get("teacher") or {}).get("model"):
        proto["teacher"] = d["teacher"]["model"]
    return proto


class RecordIndex:
    """The completed records of one results folder, read once per planning, by run folder's parent
    (`runs/<dataset>/<model>/<method>/`): where an older record of a planned run would be."""

    def __init__(self) -> None:
        self.parents: dict[Path, list[tuple[Path, RunConfig]]] = {}

    def siblings(self, folder: Path) -> list[tuple[Path, RunConfig]]:
        parent = folder.parent
        if parent not in self.parents:
            found = []
            for other in sorted(parent.glob("*/")) if parent.is_dir() else []:
                try:
                    rec = read_record(other)
                    if rec is not None and rec.completed:
                        found.append((other, parse_config(rec.config, with_plugins=False)))
                except (StorageError, ConfigError):  # unreadable, or a config this version cannot read
                    continue
            self.parents[parent] = found
        return self.parents[parent]

    def stale_record(self, plan: PlannedRun) -> StaleRecord | None:
        """A completed record of the same request under other resolved settings, if one is kept."""
        for other, cfg in self.siblings(plan.out):
            if other != plan.out and cfg.request == plan.cfg.request:
                return StaleRecord(other, identity_changes(cfg.identity(), plan.cfg.identity()))
        return None


def expand(spec: Spec, sweep: Sweep) -> list[PlannedRun]:
    """All runs of a table for a preset: teachers first, then stage runs, then rows x seeds (skips explained),
    each from the spec's rows resolved once (`resolve`)."""
    overrides = list(sweep.overrides)
    teachers: dict[str, PlannedRun] = {}
    stages: dict[str, PlannedRun] = {}
    planned: list[PlannedRun] = []
    records = RecordIndex()
    settings: dict[int, dict[str, Any]] = {}  # id(planned row) -> its settings, for the compute-matched Students

    def configure(pr: PlannedRun, data: dict[str, Any], sets: list[str], planned_keys: tuple[str, ...] = ()) -> None:
        pr.protocol = protocol_of(data, sets)
        if pr.skipped:
            return
        try:
            cfg = build_config(data, sets)
        except ConfigError as e:
            pr.skipped = f"invalid configuration: {e}"
            return
        for k in planned_keys:  # set by the planner, never asked for (as `teacher.checkpoint`, PLANNED_KEYS)
            cfg.request.pop(k, None)
        cfg.output.dir = str(run_dir(sweep.results, cfg))
        cfg.output.table, cfg.output.preset, cfg.output.row = sweep.name, sweep.preset, pr.key  # the loggers' names
        pr.cfg = cfg
        pr.protocol["temperature"], pr.protocol["weights"] = temperatures_and_weights(cfg.method.options)
        if not pr.recorded():
            pr.stale = records.stale_record(pr)

    def shared(pr: PlannedRun, index: dict[str, PlannedRun]) -> PlannedRun:
        """One planned run per run folder (a teacher or stage several rows need); skipped ones by protocol."""
        ident = str(pr.out) if pr.cfg else f"{pr.key}:{pr.seed}:{json.dumps(pr.protocol, sort_keys=True)}"
        return index.setdefault(ident, pr)

    def teacher_run(name: str, group_base: dict[str, Any], seed: int) -> PlannedRun:
        data = merge(group_base, {"model": {"name": name}, "method": {"name": "student"}, "train": {"seed": seed}})
        pr = PlannedRun(key=f"teacher:{name}", group="teacher", row=name, seed=seed, cfg=None, role="teacher",
                        needs_weights=True, model=name)
        # the spec's and the user's settings apply to the teacher too, except method options
        configure(pr, data, [o for o in overrides if not o.startswith("method.")])
        return shared(pr, teachers)

    def stage_run(stage: StageRun, row: PlannedRun, data: dict[str, Any], teacher: PlannedRun | None) -> PlannedRun:
        """The row's configuration (teacher included) with the stage's method, the row's shared options and
        the stage's settings: its artefact is its checkpoint. A stage method whose run trains on the teacher
        itself (`student_is_teacher`, MasKD's tokens) has the teacher run's network for its own, so the rows of
        every student of one teacher share it."""
        options, iters = {}, {}
        try:  # the row's resolved values (defaults included) of the options the stage shares, and its iterations
            resolved = build_config(data, overrides)
            options = {k: resolved.method.options[k] for k in stage.shared_options}
            if stage.iters_fraction != 1.0:
                iters = {"train": {"iters": max(1, round(resolved.train.iters * stage.iters_fraction))}}
        except ConfigError:
            pass  # the row itself reports its invalid configuration
        base = {k: v for k, v in data.items() if k != "method"}
        model = row.model
        if METHODS.get(stage.method).student_is_teacher and teacher is not None and teacher.cfg is not None:
            base["model"], model = dataclasses.asdict(teacher.cfg.model), teacher.cfg.model.name
        stage_data = merge(merge(merge(base, {"method": {"name": stage.method, **options}}), iters), stage.settings)
        pr = PlannedRun(key=f"stage:{stage.method}:{row.group}", group="stage", row=stage.method, seed=row.seed,
                        cfg=None, role="stage", needs_weights=True, model=model, method=stage.method,
                        dependencies=list(row.dependencies))
        # the row's `--set`s, less its method options and, when the stage scales the row's iterations, its
        # `train.iters` (already in the scaled count)
        configure(pr, stage_data, [o for o in overrides if not o.startswith("method.")
                                   and not (iters and o.replace(" ", "").startswith("train.iters="))])
        return shared(pr, stages)

    for req in resolve(spec, sweep.preset):
        for seed in sweep.seeds:
            pr = PlannedRun(key=req.key, group=req.group, row=req.row, seed=seed, cfg=None, paper=dict(req.paper),
                            metric_source=req.metric, model=req.model, method=req.method, show=dict(req.show),
                            group_spec=req.group_spec, row_spec=req.row_spec)
            data = merge(req.settings, {"train": {"seed": seed}})
            if req.teacher:
                tname = req.teacher.model
                t = teacher_run(tname, req.teacher.settings, seed if req.teacher.same_seed else seed + TEACHER_SEED_OFFSET)
                data = merge(data, {"teacher": {"model": tname}})
                if t.cfg is not None:
                    data = merge(data, {"teacher": {"checkpoint": str(checkpoint_of(t.out))}})
                    pr.dependencies.append(Dependency("teacher", str(t.out)))
                else:
                    pr.skipped = f"teacher {tname}: {t.skipped}"
            planned_keys: tuple[str, ...] = ()
            stage = METHODS.get(req.method).stage if req.method in METHODS else None
            if stage is not None and not pr.skipped:
                st = stage_run(stage, pr, data, t if req.teacher else None)
                if st.cfg is not None:
                    data = merge(data, {"method": {stage.artefact_option: str(checkpoint_of(st.out))}})
                    planned_keys = (f"method.options.{stage.artefact_option}",)
                    pr.dependencies.append(Dependency("stage", str(st.out)))
                else:
                    pr.skipped = f"stage {stage.method}: {st.skipped}"
            configure(pr, data, overrides, planned_keys)
            if req.teacher:
                pr.protocol["teacher_seed"] = t.seed
            planned.append(pr)
            settings[id(pr)] = data

    def matched_run(student: PlannedRun, cost: float, kd_rows: list[PlannedRun], measured: bool) -> PlannedRun:
        """The group's Student of `student`'s seed trained for `cost` times its iterations (the poly schedule
        decays over the new total)."""
        iters = round(student.cfg.train.iters * cost)
        label = f"Student (compute ×{cost:.2f})"
        pr = PlannedRun(key=f"{student.group}/{label}", group=student.group, row=label, seed=student.seed, cfg=None,
                        model=student.model, method="student", group_spec=student.group_spec,
                        row_spec=student.row_spec, matches=cost)
        if measured:  # its length comes from their step times: it waits for them (the graph's edge)
            pr.dependencies = [Dependency("compute-matched", str(r.out)) for r in [student, *kd_rows]]
        configure(pr, settings[id(student)], overrides + [f"train.iters={iters}"])
        return pr

    if sweep.compute_matched:
        planned += plan_compute_matched(planned, sweep, matched_run)
    return weights_only_where_needed(list(teachers.values()) + list(stages.values()) + planned)


def weights_only_where_needed(plans: list[PlannedRun]) -> list[PlannedRun]:
    """A teacher's or stage run's checkpoint is needed only while a run that loads it is still to train: a recorded
    one whose dependants are all done is done without it (a fresh clone keeps records, not weights, and training a
    teacher again that nothing will load wastes its whole cost). Settled to a fixed point: a stage run no row
    needs any more no longer needs its teacher either. `--restore-weights` asks for every run's weights anyway
    (it sets `needs_weights` after planning)."""
    planned = [p for p in plans if p.cfg is not None]
    # each folder's record and checkpoint read once: only `needs_weights` changes while settling
    recorded = {str(p.out): p.recorded() for p in planned}
    weights = {str(p.out): has_weights(p.out) for p in planned}

    def done(p: PlannedRun) -> bool:  # `PlannedRun.done` on what was read
        return recorded[str(p.out)] and (not p.needs_weights or weights[str(p.out)])

    settled = False
    while not settled:
        settled = True
        loading = {f for q in planned if not done(q) for f in q.depends_on}
        for p in planned:
            if p.needs_weights and str(p.out) not in loading and recorded[str(p.out)] and not weights[str(p.out)]:
                p.needs_weights, settled = False, False
    return plans


def step_time_per_image(plan: PlannedRun) -> float | None:
    """Measured training seconds per image of a row's completed record (its step times over the images it
    trained on), None until it has one."""
    try:
        rec = plan.record()
    except StorageError:
        return None
    if rec is None or not rec.completed or rec.config_hash != plan.cfg.identity_hash() or not rec.step_time_s:
        return None
    images = rec.iterations * plan.cfg.data.batch_size * rec.world_size
    return rec.step_time_s / images if images else None


def cost_class(ratio: float) -> float:
    """A training cost relative to the Student rounded to `COST_CLASS_STEP`: rows within 5% share one run."""
    return round(round(ratio / COST_CLASS_STEP) * COST_CLASS_STEP, 2)


def plan_compute_matched(planned: list[PlannedRun], sweep: Sweep,
                         matched_run: Callable[[PlannedRun, float, list[PlannedRun], bool], PlannedRun]) -> list[PlannedRun]:
    """Per group and seed, one Student per distinct cost class of the group's KD rows (`--compute-matched`).

    A KD row's cost over its Student's is (iterations x batch x cost per image) over the Student's: the cost per
    image is the counted training FLOPs (`engine.cost`, the report's `train FLOPs ×`) with `flops`, the
    records' measured step time per image with `time`, averaged over the row's seeds (until every seed's
    record exists the row has no class yet, and the Student waits, shown as skipped). Classes equal to 1.00 need no run: the plain Student is it."""
    cache = CostCache(sweep.results)
    extra: list[PlannedRun] = []
    for (group, seed) in dict.fromkeys((p.group, p.seed) for p in planned if p.is_row):
        rows = [p for p in planned if p.is_row and p.group == group and p.seed == seed and p.cfg is not None]
        student = next((p for p in rows if p.method == "student" and p.metric_source == "student"
                        and p.matches is None), None)
        if student is None:
            continue
        kd_rows = [p for p in rows if p.method != "student" and p.model == student.model]

        def per_image(p: PlannedRun) -> float | None:
            if sweep.compute_matched == "flops":
                return cached_step_flops(p.cfg, cache)
            # the mean over the row's seeds, once every seed has its record: one class for every seed of a row
            times = [step_time_per_image(q) for q in planned if q.key == p.key and q.is_row and q.cfg is not None]
            return sum(times) / len(times) if times and None not in times else None

        base = per_image(student)
        by_class: dict[float, list[PlannedRun]] = {}
        waiting: list[PlannedRun] = []
        for p in kd_rows:
            mine = per_image(p)
            if base is None or mine is None:
                waiting.append(p)
                continue
            p.cost_class = cost_class(p.cfg.train.iters * p.cfg.data.batch_size * mine
                                      / (student.cfg.train.iters * student.cfg.data.batch_size * base))
            by_class.setdefault(p.cost_class, []).append(p)
        for cost, members in sorted(by_class.items()):
            if cost != 1.0:
                extra.append(matched_run(student, cost, members, sweep.compute_matched == "time"))
        if waiting:
            label = "Student (compute-matched by time)"
            pr = PlannedRun(key=f"{group}/{label}", group=group, row=label, seed=seed, cfg=None, model=student.model,
                            method="student", group_spec=student.group_spec, row_spec=student.row_spec,
                            protocol=dict(student.protocol),
                            skipped="waiting for the step times of " + ", ".join(
                                p.row for p in ([student] if base is None else []) + waiting)
                            + ": planned once their records exist (run again)",
                            dependencies=[Dependency("compute-matched", str(r.out)) for r in [student, *waiting]])
            extra.append(pr)
    cache.save()
    return extra


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds expects non-negative integers, got {text!r}")
    return seeds
