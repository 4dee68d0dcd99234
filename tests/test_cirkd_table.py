"""The `cirkd` table (sdesbench/specs/cirkd.yaml): CIRKD's v1 protocol on Cityscapes, CamVid and VOC and its SegFormer
group (AdamW, README at 2d8ad0f), its networks, one teacher per dataset (and the SegFormer group's MiT-B4) shared
by the rows and the Teacher row, and per-preset method options
(CIRKD's queue lengths on `paper`, small queues on `smoke`). Planning only: nothing is trained here."""
from __future__ import annotations

import pytest

from conftest import assert_one_line_error, run_cli
from sdesbench.errors import ConfigError
from sdesbench.experiments.plan import Sweep
from sdesbench.experiments.spec import load_spec
from sdesbench.methods import METHODS


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    return Sweep("cirkd", "paper", (0,), tmp_path_factory.mktemp("cirkd")).plans(load_spec("cirkd"))


def test_paper_protocol_per_dataset(paper):
    """CIRKD's train_*.py defaults on every CNN run; 360x360 CamVid crops scored on test, VOC trainaug on val; the
    SegFormer group's scripts (2d8ad0f): 160K iterations, batch 8, 1024x1024 crops, AdamW lr 0.0002."""
    protocols = {}
    for p in paper:
        c = p.cfg
        segformer = c.model.name.startswith("segformer")
        assert (c.train.iters, c.data.batch_size, c.train.lr, c.train.weight_decay, c.train.optimizer) == \
               ((160000, 8, 0.0002, 1e-4, "adamw") if segformer else (40000, 16, 0.02, 1e-4, "sgd")), p.key
        assert c.train.momentum == 0.9 and c.train.poly_power == 0.9, p.key
        assert c.data.scale == [0.5, 2.0] and c.data.flip and c.model.pretrained, p.key
        assert (c.eval.mode, c.eval.scale, c.eval.tta) == ("whole", 1.0, False), p.key
        if segformer:
            assert (c.data.name, tuple(c.data.crop), c.model.aux) == ("cityscapes", (1024, 1024), False), p.key
            continue
        where = "teacher" if p.is_teacher else p.group.split(",")[0] if "," in p.group else "Cityscapes"
        protocols.setdefault(where, set()).add(
            (c.data.name, c.data.train_split, c.data.eval_split, tuple(c.data.crop)))
    assert protocols == {"Cityscapes": {("cityscapes", "train", "val", (512, 1024))},
                         "CamVid": {("camvid", "train", "test", (360, 360))},
                         "VOC": {("voc", "trainaug", "val", (512, 512))},
                         "teacher": protocols["teacher"]}
    assert len(protocols["teacher"]) == 3  # one teacher per dataset


def test_cirkd_networks_and_the_aux_head_on_resnets_only(paper):
    models = {p.cfg.model.name: p.cfg.model.aux for p in paper}
    assert models == {"deeplabv3_resnet18_cirkd": True, "deeplabv3_mobilenetv2_cirkd": False,
                      "pspnet_resnet18": True, "deeplabv3_resnet101_cirkd": True,
                      "segformer_mit_b0": False, "segformer_mit_b4": False}


def test_every_distilled_row_uses_its_datasets_teacher_which_is_also_its_teacher_row(paper):
    teachers = {(p.cfg.data.name, p.cfg.model.name): p for p in paper if p.is_teacher}
    assert set(teachers) == {("cityscapes", "deeplabv3_resnet101_cirkd"), ("camvid", "deeplabv3_resnet101_cirkd"),
                             ("voc", "deeplabv3_resnet101_cirkd"), ("cityscapes", "segformer_mit_b4")}
    rows = [p for p in paper if not p.is_teacher]
    for p in rows:
        if p.method == "student":
            continue
        teacher = "segformer_mit_b4" if p.group.startswith("SegFormer") else "deeplabv3_resnet101_cirkd"
        t = teachers[p.cfg.data.name, teacher]
        assert p.depends_on == [str(t.out)] and p.cfg.teacher.model == teacher, p.key
    # the MobileNetV2 group turns its own aux head off; its teacher stays the ResNet groups' teacher. The SegFormer
    # group's teacher has none (the group's teacher_config), and is its Teacher row
    for (data, model), t in teachers.items():
        (row,) = [p for p in rows if p.row == "Teacher" and p.cfg.data.name == data and p.cfg.model.name == model]
        assert row.out == t.out and t.cfg.model.aux == (model != "segformer_mit_b4")


def test_recipes_and_per_dataset_cirkd_weights(paper):
    by_key = {p.key: p for p in paper}
    recipes = {p.row: p.method for p in paper if p.group == "DeepLabV3-ResNet-18"}
    assert recipes == {"Baseline": "student", "KD": "kl", "SKD": "skd", "IFVD": "ifvd+kd+adv", "CWD": "cwd+kd+adv",
                       "DSD": "dsd", "CIRKD": "cirkd+kd", "DIST": "dist", "FitNet": "fitnet+kd"}
    weights = {k: (o["cirkd_pixel_weight"], o["cirkd_region_weight"], o["cirkd_pixel_memory"])
               for k, o in ((p.key, p.cfg.method.options) for p in paper if p.method == "cirkd+kd")}
    for key, w in weights.items():  # CIRKD's train_cirkd/voc scripts: memory terms at 0.01; 20,000-pixel queues
        if key.startswith("SegFormer"):  # train_cirkd/citys/segformer_mit_b0.sh: --pixel-memory-size 2000
            assert w == (0.1, 0.1, 2000) and by_key[key].cfg.method.options["cirkd_batch_pool"] == 2, key
            continue
        assert w == ((0.01, 0.01, 20000) if key.startswith("VOC") else (0.1, 0.1, 20000)), key
        assert by_key[key].cfg.method.options["cirkd_batch_pool"] == 1, key
    cwd = by_key["SegFormer MiT-B0/CWD"].cfg.method.options  # train_cwd.sh's SegFormer command
    assert (cwd["cwd_weight"], cwd["cwd_feature_weight"]) == (0.3, 5.0)
    assert (by_key["DeepLabV3-ResNet-18/CWD"].cfg.method.options["cwd_feature_weight"]) == 50.0
    assert by_key["DeepLabV3-ResNet-18/DSD"].cfg.method.options["dsd_psd_weight"] == 1000.0  # train_dsd.sh
    fit = by_key["DeepLabV3-ResNet-18/FitNet"].cfg.method.options  # train_fitnet.sh: --lambda-kd 1 --lambda-fitnet 10
    assert (fit["fitnet_weight"], fit["kd_weight"]) == (10.0, 1.0)
    # CIRKD's reductions on every row that has them (docs/methods-tskd.md, conformance table)
    for p in paper:
        o = p.cfg.method.options
        if "kd_valid_only" in o:
            assert o["kd_valid_only"] is False, p.key
        if "adv_spectral_norm" in o:
            assert o["adv_spectral_norm"] == "shared", p.key
    ifvd, cirkd = by_key["PSPNet-ResNet-18/IFVD"].cfg.method.options, by_key["VOC, PSPNet-ResNet-18/CIRKD"].cfg.method.options
    assert ifvd["ifvd_valid_only"] is False and cirkd["cirkd_enqueue_from"] == "first_n_positions"
    assert by_key["DeepLabV3-MobileNetV2/CWD"].cfg.method.options["cwd_channel_norm"] == "student"


def test_reference_column_is_cirkds_readme_at_91735ef():
    spec = load_spec("cirkd")
    ref = {(g.name, r.label): r.miou for g in spec.groups for r in g.rows if r.miou is not None}
    assert ref[("DeepLabV3-ResNet-18", "CIRKD")] == 76.38 and ref[("DeepLabV3-MobileNetV2", "CWD")] == 74.66
    assert ref[("PSPNet-ResNet-18", "Baseline")] == 72.55 and ref[("DeepLabV3-ResNet-101 (teacher)", "Teacher")] == 78.07
    assert ref[("CamVid, PSPNet-ResNet-18", "CIRKD")] == 68.65 and ref[("VOC, DeepLabV3-ResNet-18", "Baseline")] == 73.21
    assert ("PSPNet-ResNet-18", "SKD") not in ref and ("DeepLabV3-ResNet-18", "DIST") not in ref  # no README number
    segformer = {label: ref["SegFormer MiT-B0", label] for label in ("Baseline", "SKD", "IFVD", "CWD", "DSD", "CIRKD")}
    assert segformer == {"Baseline": 75.58, "SKD": 76.43, "IFVD": 76.30, "CWD": 74.80, "DSD": 76.62, "CIRKD": 76.92}
    assert ref[("SegFormer MiT-B4 (teacher)", "Teacher")] == 81.23  # README at 2d8ad0f, third column
    # R18, MBV2, PSPNet, teacher; CamVid and VOC: 2 + 2 + teacher; SegFormer: 6 + teacher
    assert len(ref) == 6 + 6 + 2 + 1 + 5 + 5 + 7


def test_smoke_runs_every_row_on_tiny_with_small_queues(tmp_path):
    smoke = Sweep("cirkd", "smoke", (0,), tmp_path).plans(load_spec("cirkd"))
    assert {p.cfg.data.name for p in smoke} == {"tiny"} and {p.cfg.train.iters for p in smoke} == {40}
    for p in smoke:
        o = p.cfg.method.options
        if p.method == "cirkd+kd":
            assert (o["cirkd_pixel_memory"], o["cirkd_region_memory"], o["cirkd_pixel_contrast"]) == (64, 8, 64)
        if p.method == "dsd":  # PSD's weight scaled to the 6x6 grid of 48x48 crops: 1000 x 36 / 8192
            assert o["dsd_psd_weight"] == pytest.approx(1000 * 36 / 8192, abs=0.01)
    # on tiny the CamVid and VOC groups coincide with the Cityscapes rows, except VOC's CIRKD weights; SegFormer: 7
    assert len({p.out for p in smoke}) == 37
    proc = run_cli("run", "cirkd", "--preset", "smoke", "--dry-run", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "37 distinct runs" in proc.stdout + proc.stderr


SPEC = """\
title: preset options
metrics: [miou]
presets:
  paper: {data: {name: tiny}}
  smoke:
    data: {name: tiny}
    options:
      kl: {kd_temperature: 4.0}
options:
  kl: {kd_temperature: 2.0, kd_weight: 3.0}
groups:
  - name: G
    model: deeplabv3_resnet18
    options:
      kl: {kd_weight: 5.0}
    rows:
      - {label: KD, method: kl, teacher: true}
"""


def test_preset_options_apply_to_their_preset_only_over_spec_and_group(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(SPEC)
    spec = load_spec(str(path))
    (smoke,) = [p for p in Sweep(str(path), "smoke", (0,), tmp_path).plans(spec) if not p.is_teacher]
    (paper,) = [p for p in Sweep(str(path), "paper", (0,), tmp_path).plans(spec) if not p.is_teacher]
    assert (smoke.cfg.method.options["kd_temperature"], smoke.cfg.method.options["kd_weight"]) == (4.0, 5.0)
    assert (paper.cfg.method.options["kd_temperature"], paper.cfg.method.options["kd_weight"]) == (2.0, 5.0)
    path.write_text(SPEC.replace("      kl: {kd_temperature: 4.0}", "      klx: {kd_temperature: 4.0}"))
    with pytest.raises(ConfigError, match="klx"):
        load_spec(str(path))
    assert_one_line_error(run_cli("run", str(path), "--preset", "smoke", "--dry-run"), "klx")
    assert "klx" not in METHODS.names()
