"""MasKD's two runs in a table: `sdesbench run` plans the stage-1 run (`maskd-tokens`) on the row's teacher
network, once per teacher whatever the student, at the reference's stage-1 lr and weight decay, and passes its
checkpoint to the student run; a changed stage-1 option is another stage run and another student key (the older
student record is then stale). Planning only: nothing is trained here (the runs themselves: tests/test_tskd.py's
end-to-end run and the frontier smoke table)."""
from __future__ import annotations

from sdesbench.experiments.plan import Sweep, checkpoint_of
from sdesbench.identity import identity_changes

SPEC = """title: maskd stages
presets:
  smoke:
    data: {name: tiny, crop: [32, 32], batch_size: 2}
    train: {iters: 2, lr: 0.01}
options:
  maskd: {maskd_num_tokens: NUM}
groups:
  - name: R18
    model: deeplabv3_resnet18
    rows: [{label: MasKD, method: maskd, teacher: deeplabv3_resnet50}]
  - name: ENet
    model: enet
    rows: [{label: MasKD, method: maskd, teacher: deeplabv3_resnet50}]
"""


def plans(tmp_path, num_tokens: int, overrides: tuple[str, ...] = ()):
    spec = tmp_path / f"maskd_{num_tokens}.yaml"
    spec.write_text(SPEC.replace("NUM", str(num_tokens)))
    return Sweep(str(spec), "smoke", (0,), tmp_path / "results", overrides=overrides).plans()


def test_stage_one_runs_on_the_teacher_once_per_teacher_and_keys_the_students(tmp_path):
    teacher, stage, r18, enet = plans(tmp_path, 4)
    assert [p.role for p in (teacher, stage, r18, enet)] == ["teacher", "stage", "row", "row"]
    # the stage run's network is the teacher run's, so the two students share it
    assert stage.cfg.model == teacher.cfg.model and stage.cfg.teacher.model == "deeplabv3_resnet50"
    assert stage.cfg.method.name == "maskd-tokens"
    assert stage.cfg.method.options == {"maskd_num_tokens": 4, "maskd_dice_weight": 1.0}
    assert (stage.cfg.train.lr, stage.cfg.train.weight_decay) == (0.1, 1e-3)  # train_mask_module.py's
    # a quarter of the row's iterations (the reference: 10K tokens iterations, 40K student ones), at least 1
    assert (stage.cfg.train.iters, r18.cfg.train.iters) == (1, 2)
    _, stage_n, r18_n, _ = plans(tmp_path, 4, ("train.iters=40",))
    assert (stage_n.cfg.train.iters, r18_n.cfg.train.iters) == (10, 40)
    for row in (r18, enet):
        assert row.cfg.method.options["maskd_tokens"] == str(checkpoint_of(stage.out))
        assert [d.kind for d in row.dependencies] == ["teacher", "stage"] and str(stage.out) in row.depends_on
        assert row.cfg.train.lr == 0.01
    # another stage-1 option: another stage run and other student keys
    _, stage8, r18_8, _ = plans(tmp_path, 8)
    assert stage8.out != stage.out and r18_8.out != r18.out
    changed = {k for k, _, _ in identity_changes(r18.cfg.identity(), r18_8.cfg.identity())}
    assert changed == {"method.options.maskd_num_tokens", "method.options.maskd_tokens"}
