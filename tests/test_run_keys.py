"""Records that cannot go stale (issue 20): a run's key is the hash of its resolved configuration (every
method option after `parse_options`, every setting at its value); a record made under other defaults is
found, marked stale with what changed, and never shown as a current cell; a teacher is its own run."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys

import pytest


from conftest import ROOT, cli_env, read_json, run_cli
from sdesbench.engine.configure import build_config
from sdesbench.experiments.plan import TEACHER_SEED_OFFSET, Sweep
from sdesbench.experiments.spec import load_spec
from sdesbench.methods import METHODS
from sdesbench.report.rows import collect

SDES_VARIANTS = ("sdes", "sdes-no-dfed", "sdes-no-dped", "sdes-random-split")
EVAL_SETTINGS_ADDED_LATER = ("mode", "crop", "stride", "scales", "flip", "tta_rule", "absent_classes", "resize",
                             "resizer")


def test_the_key_is_the_hash_of_the_resolved_configuration():
    cfg = build_config({"method": {"name": "sdes"}})
    options = dataclasses.asdict(METHODS.get("sdes").parse_options({}, 11))
    assert cfg.method.options == json.loads(json.dumps(options))  # every default written out
    # the plugins to load are never part of the key; the sha256 of a plugin the run uses is, and a built-in run
    # uses none (config.HASHED_WHEN_SET)
    expected = {k: v for k, v in cfg.to_dict().items() if k not in ("output", "request", "plugins", "plugin_sha256")}
    expected["data"] = {k: v for k, v in expected["data"].items() if k not in ("root", "workers", "check")}
    expected["train"] = {k: v for k, v in expected["train"].items()
                         if k not in ("checkpoint_every", "keep_checkpoints_every", "keep_best", "log_every", "device",
                                      "hooks", "dist_timeout_s", "optimizer")}  # optimizer: added later, keyed when set
    # eval settings added after runs were recorded count only away from their default (config.HASHED_WHEN_SET)
    expected["eval"] = {k: v for k, v in expected["eval"].items()
                        if k not in ("every", "every_max_images", "workers") + EVAL_SETTINGS_ADDED_LATER}
    blob = json.dumps(expected, sort_keys=True, default=str).encode()
    assert cfg.identity_hash() == hashlib.sha256(blob).hexdigest()[:12]
    # naming a default explicitly is the same run; another value is another run
    assert build_config({"method": {"name": "sdes", "p": 1.0, "gamma": 0.5}}).identity_hash() == cfg.identity_hash()
    assert build_config({"method": {"name": "sdes", "p": 2.0}}).identity_hash() != cfg.identity_hash()


def change_default(monkeypatch, methods, option, value):
    """Each method's Options with `option` defaulting to `value`, as if its source had been edited."""
    for name in methods:
        cls = METHODS.get(name)
        new = dataclasses.make_dataclass(cls.Options.__name__, [(option, type(value), dataclasses.field(default=value))],
                                         bases=(cls.Options,))
        monkeypatch.setattr(cls, "Options", new)


def statuses(table: str, results=ROOT / "results") -> dict[str, str]:
    return {p.key: p.status() for p in Sweep(table, "smoke", (0,), results).plans() if not p.is_teacher}


def test_committed_records_are_current_and_a_changed_default_makes_only_its_rows_stale(monkeypatch):
    assert set(statuses("table4").values()) == {"done"}
    change_default(monkeypatch, SDES_VARIANTS, "p", 2.0)
    after = statuses("table4")
    assert after.pop("EfficientNet-B0/L_SS") == "done"
    assert len(after) == 4
    for key, status in after.items():
        assert status.startswith("stale (method.p: 1.0 -> 2.0)"), (key, status)
    # the report shows a stale record as stale, never as a number
    plans = Sweep("table4", "smoke", (0,), ROOT / "results").plans()
    rows = {e.plan.key: e for e in collect(plans, ("miou",))}
    assert rows["EfficientNet-B0/L_SS"].values["miou"]
    stale = rows["EfficientNet-B0/L_SS + L_DPED + L_DFED"]
    assert stale.values["miou"] == [] and stale.status[0].startswith("stale (method.p: 1.0 -> 2.0)")


def test_a_default_changed_in_a_copy_retrains_in_a_new_folder_and_keeps_the_old_record(tmp_path):
    """As a developer meets it: the package copied, one default edited in its source, the same table run."""
    spec = tmp_path / "lsr_table.yaml"
    spec.write_text("""title: lsr
metrics: [miou]
presets:
  smoke:
    data: {name: tiny, crop: [32, 32], batch_size: 2}
    train: {iters: 2, checkpoint_every: 100}
    eval: {max_images: 2}
groups:
  - name: ENet
    model: enet
    rows:
      - {label: LSR, method: lsr}
""")
    results = tmp_path / "results"
    first = run_cli("run", str(spec), "--results", str(results), "--no-progress")
    assert first.returncode == 0, first.stderr
    (old,) = (results / "runs" / "tiny" / "enet" / "lsr").iterdir()
    source = (ROOT / "sdesbench" / "methods" / "lsr.py").read_text()
    default = "epsilon: float = field(default=0.1,"
    assert source.count(default) == 1
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "sdesbench", copy / "sdesbench", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "sdesbench" / "methods" / "lsr.py").write_text(source.replace(default, default.replace("0.1", "0.25")))
    env = cli_env()
    env["PYTHONPATH"] = str(copy)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sdesbench", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=600)

    plan = cli("run", str(spec), "--results", str(results), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "stale (method.epsilon: 0.1 -> 0.25)" in plan.stdout, plan.stdout
    second = cli("run", str(spec), "--results", str(results), "--no-progress")
    assert second.returncode == 0, second.stderr
    folders = sorted((results / "runs" / "tiny" / "enet" / "lsr").iterdir())
    assert len(folders) == 2 and old in folders
    new = next(f for f in folders if f != old)
    assert read_json(old / "results.json")["config"]["method"]["options"]["epsilon"] == 0.1  # kept as it was
    assert read_json(new / "results.json")["config"]["method"]["options"]["epsilon"] == 0.25


def test_another_pre_trained_student_is_another_run_with_its_own_seed():
    plans = Sweep("table3", "smoke", (0, 3)).plans()
    teachers = {p.seed: p for p in plans if p.is_teacher}
    assert sorted(teachers) == [TEACHER_SEED_OFFSET, 3 + TEACHER_SEED_OFFSET]
    for seed in (0, 3):
        student = next(p for p in plans if p.key == "EfficientNet-B0/Student" and p.seed == seed)
        for label in ("KL*", "AT*", "CWD*"):
            kd = next(p for p in plans if p.key == f"EfficientNet-B0/{label}" and p.seed == seed)
            (teacher_dir,) = kd.depends_on
            assert teacher_dir == str(teachers[seed + TEACHER_SEED_OFFSET].out) != str(student.out)
            assert kd.protocol["teacher_seed"] == seed + TEACHER_SEED_OFFSET
            assert kd.cfg.teacher.checkpoint.startswith(teacher_dir)
        teacher_cfg = teachers[seed + TEACHER_SEED_OFFSET].cfg
        assert teacher_cfg.train.seed == seed + TEACHER_SEED_OFFSET
        assert dataclasses.replace(teacher_cfg.train, seed=seed) == student.cfg.train  # otherwise the same run
        assert teacher_cfg.model == student.cfg.model and teacher_cfg.data == student.cfg.data


def test_teacher_seed_same_is_the_student_row_itself():
    spec = load_spec("table3")
    spec.teacher_seed = "same"
    plans = Sweep("table3", "smoke", (0,)).plans(spec)
    student = next(p for p in plans if p.key == "EfficientNet-B0/Student")
    kd = next(p for p in plans if p.key == "EfficientNet-B0/KL*")
    assert kd.depends_on == [str(student.out)] and kd.protocol["teacher_seed"] == 0


def test_dry_run_shows_the_teachers_seed_and_each_dependency_with_its_kind():
    proc = run_cli("run", "table3", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "EfficientNet-B0/KL*" in ln)
    assert f"│ {TEACHER_SEED_OFFSET}" in line, line
    assert "│ teacher: tiny/deeplabv3_efficientnet_b0/student/" in line, line


def test_a_group_on_another_dataset_names_its_protocol_per_preset(tmp_path):
    """One table, groups on different datasets (CIRKD's Cityscapes, CamVid and VOC groups): a group's
    `presets:` settings apply at that preset only; at `smoke` every group runs on the built-in data."""
    spec = tmp_path / "mixed.yaml"
    spec.write_text("""title: mixed
presets:
  paper:
    data: {name: cityscapes, crop: [512, 1024], batch_size: 16}
    train: {iters: 40000, lr: 0.02}
  smoke:
    data: {name: tiny, crop: [32, 32], batch_size: 2}
    train: {iters: 2}
groups:
  - name: Cityscapes R18
    model: deeplabv3_resnet18
    rows: [{label: Baseline, method: student}]
  - name: CamVid R18
    model: deeplabv3_resnet18
    presets:
      paper: {data: {name: camvid, crop: [360, 360], batch_size: 8}, train: {iters: 10000}}
    rows: [{label: Baseline, method: student}]
""")
    paper = {p.group: p.cfg for p in Sweep(str(spec), "paper", (0,), tmp_path).plans()}
    assert paper["Cityscapes R18"].data.name == "cityscapes" and paper["CamVid R18"].data.name == "camvid"
    assert paper["CamVid R18"].data.crop == [360, 360] and paper["CamVid R18"].train.iters == 10000
    assert paper["CamVid R18"].train.lr == 0.02  # the rest of the preset still applies
    smoke = {p.group: p.cfg for p in Sweep(str(spec), "smoke", (0,), tmp_path).plans()}
    assert {c.data.name for c in smoke.values()} == {"tiny"}
    assert smoke["Cityscapes R18"].identity_hash() == smoke["CamVid R18"].identity_hash()  # the same run there


def test_eval_settings_added_later_keep_recorded_keys_and_name_new_runs_when_set():
    """Issue 22: eval.mode/crop/stride/scales/flip/tta_rule/absent_classes are part of a run's key only when
    set away from their default, so every run recorded before they existed keeps its key."""
    base = build_config({})
    assert not set(EVAL_SETTINGS_ADDED_LATER) & set(base.identity()["eval"])
    defaults = ["eval.mode=whole", "eval.flip=false", "eval.tta_rule=mmseg", "eval.absent_classes=skip",
                "eval.scales=null", "eval.crop=null", "eval.stride=null", "eval.resize=fixed", "eval.resizer=auto"]
    assert build_config({}, defaults).identity_hash() == base.identity_hash()
    others = {"eval.flip": ["eval.flip=true"], "eval.scales": ["eval.scales=[0.5, 1.0]"],
              "eval.tta_rule": ["eval.tta_rule=cirkd"], "eval.absent_classes": ["eval.absent_classes=zero"],
              "eval.resize": ["eval.resize=keep_ratio", "eval.size=[512, 512]"], "eval.resizer": ["eval.resizer=cv2"],
              "eval.mode": ["eval.mode=slide", "eval.crop=[32, 32]", "eval.stride=[16, 16]"]}
    keys = {name: build_config({}, sets).identity_hash() for name, sets in others.items()}
    assert base.identity_hash() not in keys.values() and len(set(keys.values())) == len(keys)
    assert build_config({}, others["eval.mode"]).identity()["eval"]["crop"] == [32, 32]


def test_committed_table4_records_stay_done_in_a_dry_run():
    proc = run_cli("run", "table4", "--preset", "smoke", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "EfficientNet-B0/" in line]
    assert len(rows) == 5 and all(line.rstrip().rstrip("│").rstrip().endswith("done") for line in rows), proc.stdout


def test_train_optimizer_is_keyed_only_when_set_and_builds_adamw():
    """`train.optimizer` came after runs were recorded: at its default (sgd) no key changes; adamw (CIRKD's
    SegFormer scripts) is torch's AdamW with the run's lr and weight decay, default betas."""
    from torch import nn

    from sdesbench.engine.step import TrainUnit, make_optimizer
    from sdesbench.methods import METHODS
    from sdesbench.methods.base import MethodContext

    def linear_unit() -> TrainUnit:
        """A Linear layer as the student, with the plain `student` method (no parameters of its own)."""
        student = METHODS.get("student")
        ctx = MethodContext(model=None, num_classes=2, total_iters=1, class_pixel_counts=lambda: None)
        return TrainUnit(nn.Linear(3, 2), student(student.parse_options({}), ctx))

    base = build_config({})
    assert "optimizer" not in base.identity()["train"]
    assert build_config({}, ["train.optimizer=sgd"]).identity_hash() == base.identity_hash()
    adamw = build_config({}, ["train.optimizer=adamw", "train.lr=0.0002"])
    assert adamw.identity()["train"]["optimizer"] == "adamw" and adamw.identity_hash() != base.identity_hash()
    opt = make_optimizer(linear_unit(), adamw.train)
    assert type(opt).__name__ == "AdamW"
    assert (opt.defaults["lr"], opt.defaults["weight_decay"], opt.defaults["betas"]) == (0.0002, 1e-4, (0.9, 0.999))
    assert type(make_optimizer(linear_unit(), base.train)).__name__ == "SGD"


STAGED_SPEC = """title: staged
presets:
  smoke:
    data: {name: tiny, crop: [32, 32], batch_size: 2}
    train: {iters: 2}
groups:
  - name: ENet
    model: enet
    rows: [{label: Student, method: student}, {label: Staged, method: staged, teacher: true, options: {n_tokens: 8}}]
"""


def test_a_methods_stage_run_is_planned_between_its_teacher_and_its_student_and_keys_it(tmp_path, monkeypatch):
    """A method declaring a `StageRun` (as MasKD's stage 1): one stage run with the row's teacher, shared option and
    the stage's settings, depending on the teacher; the row depends on both (each with its kind), receives the
    stage's checkpoint as its option, and a changed stage configuration changes the row's key but not what it
    asked for, which is what marks its older record stale."""
    from sdesbench.identity import identity_changes
    from sdesbench.errors import ConfigError
    from sdesbench.experiments.plan import checkpoint_of, launch_order
    from sdesbench.methods.base import StageRun, check_method
    from sdesbench.methods.student import Student

    class Tokens(Student):
        @dataclasses.dataclass
        class Options:
            n_tokens: int = 4

    class Staged(Student):
        @dataclasses.dataclass
        class Options:
            n_tokens: int = 4
            tokens: str | None = None

        stage = StageRun(method="staged-tokens", artefact_option="tokens", shared_options=("n_tokens",),
                         settings={"train": {"iters": 3}})

    check_method("staged", Staged)
    with pytest.raises(ConfigError, match="its stage names option 'count', which its Options lacks"):
        check_method("staged", type("Bad", (Staged,), {"stage": StageRun("staged-tokens", "count")}))
    monkeypatch.setitem(METHODS._entries, "staged-tokens", Tokens)
    monkeypatch.setitem(METHODS._entries, "staged", Staged)
    spec = tmp_path / "staged.yaml"
    spec.write_text(STAGED_SPEC)
    plans = Sweep(str(spec), "smoke", (0,), tmp_path / "results").plans()
    assert [p.role for p in plans] == ["teacher", "stage", "row", "row"]
    teacher, stage, _, row = plans
    assert [(d.kind, d.folder) for d in stage.dependencies] == [("teacher", str(teacher.out))]
    assert [(d.kind, d.folder) for d in row.dependencies] == [("teacher", str(teacher.out)), ("stage", str(stage.out))]
    assert stage.cfg.method.name == "staged-tokens" and stage.cfg.method.options == {"n_tokens": 8}
    assert stage.cfg.train.iters == 3 and stage.cfg.teacher == row.cfg.teacher and stage.needs_weights
    assert row.cfg.method.options == {"n_tokens": 8, "tokens": str(checkpoint_of(stage.out))}
    assert "method.options.tokens" not in row.cfg.request  # the planner's, as teacher.checkpoint
    assert [p.key for p in launch_order(plans)] == [teacher.key, stage.key, "ENet/Student", "ENet/Staged"]

    monkeypatch.setattr(Staged, "stage", dataclasses.replace(Staged.stage, settings={"train": {"iters": 4}}))
    _, stage4, _, row4 = Sweep(str(spec), "smoke", (0,), tmp_path / "results").plans()
    assert stage4.out != stage.out and row4.out != row.out and row4.cfg.request == row.cfg.request
    assert identity_changes(row.cfg.identity(), row4.cfg.identity()) == [
        ("method.options.tokens", str(checkpoint_of(stage.out)), str(checkpoint_of(stage4.out)))]
