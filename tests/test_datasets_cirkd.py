"""The datasets of CIRKD's wider table (ADE20K, COCO-Stuff-164K, PASCAL-Context 59) on small generated
fixtures in the layouts users arrive with: class counts, the label mappings (mmsegmentation's
reduce_zero_label, the COCO-Stuff converter's 182 -> 171 table), image/label pairing, split sizes,
`data check` passing and failing in one line, `data stats`; their table specs' protocols; and the
class-count section of `sdesbench bench`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import run_cli
from sdesbench.cli import app
from sdesbench.data.ade20k import ADE20K
from sdesbench.data.check import check_dataset
from sdesbench.data.coco_stuff import COCOStuff164K
from sdesbench.data.pascal_context import PascalContext59
from sdesbench.engine.runtime import Runtime
from sdesbench.experiments.plan import Sweep
from sdesbench.experiments.spec import load_spec
from sdesbench.measure.class_scaling import MANY_CLASSES, class_scaling, format_class_scaling

H, W = 12, 16


def write_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path, "JPEG")


def write_label(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(values, dtype=np.uint8), mode="L").save(path)


def rows(*bands: tuple[int, int]) -> np.ndarray:
    """A label map of horizontal bands: (value, number of rows), top to bottom, H rows in all."""
    lab = np.concatenate([np.full((n, W), v, np.uint8) for v, n in bands])
    assert lab.shape == (H, W)
    return lab


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """mmsegmentation's LoadAnnotations with reduce_zero_label, written out: 0 -> 255, k -> k - 1, 255 stays."""
    out = raw.astype(np.int64) - 1
    out[(raw == 0) | (raw == 255)] = 255
    return out


def check_json(dataset: str, root: Path) -> dict:
    """`sdesbench data check DATASET --root ROOT --json`, in this process; it must pass, stderr holding only its
    warnings (a fixture's splits are smaller than the release's)."""
    res = CliRunner().invoke(app, ["data", "check", dataset, "--root", str(root), "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert res.stderr.splitlines() == [f"warning: {w}" for w in report["warnings"]]
    return report


def problem_lines(stderr: str) -> list[str]:
    """The lines of `data check`'s stderr that are problems (its warnings, after them, start with 'warning: ')."""
    return [line for line in stderr.splitlines() if not line.startswith("warning: ")]


def size_warning(source: Path, n: int, dataset: str, split: str, release: int) -> str:
    return f"{source}: {n:,} image/label pair(s); {dataset}'s {split} split holds {release:,}"


def pairs_of(ds) -> list[tuple[str, str]]:
    return [(image.name, label.name) for image, label in ds.pairs]


# --------------------------------------------------------------------------- ADE20K


def ade_label_a() -> np.ndarray:
    """Rows 0-2 "other" (0, one pixel 255), 3-7 wall (1), 8-11 flag (150)."""
    lab = rows((0, 3), (1, 5), (150, 4))
    lab[0, 0] = 255
    return lab


def ade_label_b() -> np.ndarray:
    """Person (13) but column 0, "other" (0)."""
    lab = np.full((H, W), 13, np.uint8)
    lab[:, 0] = 0
    return lab


ADE_LABELS = {
    "training": {"ADE_train_00000001": ade_label_a(), "ADE_train_00000002": ade_label_b(),
                 "ADE_train_00000003": np.full((H, W), 2, np.uint8)},
    "validation": {"ADE_val_00000001": np.full((H, W), 1, np.uint8),
                   "ADE_val_00000002": np.full((H, W), 150, np.uint8)},
}


def make_ade20k(folder: Path) -> Path:
    """ADEChallengeData2016/{images,annotations}/{training,validation} under `folder`; returns `folder`."""
    release = folder / "ADEChallengeData2016"
    for i, (split, labels) in enumerate(ADE_LABELS.items()):
        for j, (stem, label) in enumerate(labels.items()):
            write_jpeg(release / "images" / split / f"{stem}.jpg", seed=10 * i + j)
            write_label(release / "annotations" / split / f"{stem}.png", label)
    return folder


def test_ade20k_loader_maps_zero_to_ignore_and_k_to_k_minus_1(tmp_path):
    root = make_ade20k(tmp_path)
    assert ADE20K.num_classes == len(ADE20K.class_names) == len(ADE20K.palette) == 150
    assert (ADE20K.class_names[0], ADE20K.class_names[12], ADE20K.class_names[149]) == ("wall", "person", "flag")
    train, val = ADE20K(root, "train"), ADE20K(root, "val")
    assert (len(train), len(val)) == (3, 2) and train.orphans() == []
    assert pairs_of(train) == [(f"{s}.jpg", f"{s}.png") for s in ADE_LABELS["training"]]
    for i, stem in enumerate(ADE_LABELS["training"]):
        image, mask = train.load(i)
        assert image.shape == (3, H, W) and mask.dtype == torch.int64
        assert torch.equal(mask, torch.from_numpy(reduce_zero_label(ADE_LABELS["training"][stem])))
    mask = train.load(0)[1]
    assert (mask[:3] == 255).all() and (mask[3:8] == 0).all() and (mask[8:] == 149).all()  # other, wall, flag
    assert (ADE20K(root / "ADEChallengeData2016", "val").load(1)[1] == 149).all()  # the release folder as root


def test_ade20k_check_passes_and_stats_count_hand_computed_pixels(tmp_path, monkeypatch):
    root = make_ade20k(tmp_path / "ade")
    report = check_json("ade20k", root)
    assert report["splits"] == {"train": 3, "val": 2} and report["problems"] == []
    images = root / "ADEChallengeData2016" / "images"
    assert report["sources"] == {"train": str(images / "training"), "val": str(images / "validation")}
    assert report["warnings"] == [size_warning(images / "training", 3, "ade20k", "train", 20210),
                                  size_warning(images / "validation", 2, "ade20k", "val", 2000)]
    labelled = 5 * W + 4 * W + (W - 1) * H + H * W  # wall, flag (image 1); person (image 2); building (image 3)
    share = report["class_pixel_share"]["train"]
    assert share["wall"] == pytest.approx(5 * W / labelled) and share["flag"] == pytest.approx(4 * W / labelled)
    assert share["person"] == pytest.approx((W - 1) * H / labelled) and share["sky"] == 0
    monkeypatch.setenv("SDESBENCH_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["data", "stats", "ade20k", "--root", str(root), "--json"])
    assert res.exit_code == 0, res.output
    counts = json.loads(res.output)
    assert len(counts) == 150 and sum(counts.values()) == labelled
    assert (counts["wall"], counts["flag"], counts["person"], counts["building"]) == (80, 64, 180, 192)


def test_ade20k_check_fails_in_one_line_on_a_missing_label_and_a_value_out_of_range(tmp_path):
    root = make_ade20k(tmp_path / "ade")
    release = root / "ADEChallengeData2016"
    (release / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    proc = run_cli("data", "check", "ade20k", "--root", str(root), "--no-progress")
    assert proc.returncode == 1
    assert problem_lines(proc.stderr) == [
        f"{release}/images/training/ADE_train_00000002.jpg: image without label "
        f"(expected {release}/annotations/training/ADE_train_00000002.png)"]
    root = make_ade20k(tmp_path / "ade2")
    label = root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000001.png"
    bad = np.full((H, W), 1, np.uint8)
    bad[2, 3] = 151
    write_label(label, bad)
    assert check_dataset("ade20k", root, show_progress=False)["problems"] == [
        f"{label}: label values 151 outside the known set (0..150, 255)"]


# --------------------------------------------------------------------------- COCO-Stuff-164K

COCO_TRAIN_IDS = {  # mmsegmentation's converted *_labelTrainIds.png
    ("train2017", "000000000009"): rows((0, 6), (170, 5), (255, 1)),  # person, wood, unlabelled
    ("train2017", "000000000030"): np.full((H, W), 40, np.uint8),  # wine glass; its raw map below loses
    ("val2017", "000000000139"): np.full((H, W), 100, np.uint8),
}
COCO_RAW = {  # stuffthingmaps as distributed: 182 ids (COCO category id - 1), 255 unlabelled
    ("train2017", "000000000025"): rows((0, 3), (12, 3), (181, 3), (255, 3)),  # person, stop sign, wood, -
    ("train2017", "000000000030"): np.full((H, W), 5, np.uint8),  # bus: shadowed by the train-id file
}


def make_coco_stuff(root: Path) -> Path:
    for seed, (split, stem) in enumerate(sorted(set(COCO_TRAIN_IDS) | set(COCO_RAW))):
        write_jpeg(root / "images" / split / f"{stem}.jpg", seed)
    for (split, stem), label in COCO_TRAIN_IDS.items():
        write_label(root / "annotations" / split / f"{stem}_labelTrainIds.png", label)
    for (split, stem), label in COCO_RAW.items():
        write_label(root / "annotations" / split / f"{stem}.png", label)
    return root


def test_coco_stuff_reads_train_ids_and_maps_raw_stuffthingmaps_like_the_converter(tmp_path):
    root = make_coco_stuff(tmp_path / "coco_stuff164k")
    assert COCOStuff164K.num_classes == len(COCOStuff164K.class_names) == len(COCOStuff164K.palette) == 171
    names = COCOStuff164K.class_names
    assert (names[0], names[11], names[40], names[170]) == ("person", "stop sign", "wine glass", "wood")
    train, val = COCOStuff164K(root, "train"), COCOStuff164K(root, "val")
    assert (len(train), len(val)) == (3, 1) and train.orphans() == []
    assert pairs_of(train) == [("000000000009.jpg", "000000000009_labelTrainIds.png"),
                               ("000000000025.jpg", "000000000025.png"),
                               ("000000000030.jpg", "000000000030_labelTrainIds.png")]  # the train-id file wins
    assert torch.equal(train.load(0)[1], torch.from_numpy(COCO_TRAIN_IDS[("train2017", "000000000009")]).long())
    # converter table (tools/dataset_converters/coco_stuff164k.py): 0 -> 0, 12 -> 11, 181 -> 170, 255 -> 255
    assert torch.equal(train.load(1)[1], torch.from_numpy(rows((0, 3), (11, 3), (170, 3), (255, 3))).long())
    assert (train.load(2)[1] == 40).all() and (val.load(0)[1] == 100).all()


def test_coco_stuff_check_and_stats_and_one_line_failures(tmp_path, monkeypatch):
    root = make_coco_stuff(tmp_path / "coco")
    report = check_json("coco_stuff164k", root)
    assert report["splits"] == {"train": 3, "val": 1} and report["problems"] == []
    assert report["sources"] == {"train": str(root / "images" / "train2017"), "val": str(root / "images" / "val2017")}
    assert len(report["warnings"]) == 2  # 3 and 1 pairs, not 118,287 and 5,000
    monkeypatch.setenv("SDESBENCH_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["data", "stats", "coco_stuff164k", "--root", str(root), "--json"])
    assert res.exit_code == 0, res.output
    counts = json.loads(res.output)
    assert (counts["person"], counts["stop sign"], counts["wood"], counts["wine glass"]) == (9 * W, 3 * W, 8 * W, H * W)
    assert counts["bus"] == 0 and sum(counts.values()) == 9 * W + 3 * W + 8 * W + H * W

    label = root / "annotations" / "train2017" / "000000000025.png"
    write_label(label, rows((0, 3), (11, 9)))  # 11: a COCO category no image uses, not in the table
    proc = run_cli("data", "check", "coco_stuff164k", "--root", str(root), "--no-progress")
    assert proc.returncode == 1
    assert problem_lines(proc.stderr) == [
        f"{label}: label values 11 outside the known set "
        "(0..10, 12..24, 26..27, 30..43, 45..64, 66, 69, 71..81, 83..89, 91..181, 255)"]
    write_label(label, COCO_RAW[("train2017", "000000000025")])
    (root / "annotations" / "val2017" / "000000000139_labelTrainIds.png").unlink()
    converted = root / "annotations" / "train2017" / "000000000009_labelTrainIds.png"
    write_label(converted, np.full((H, W), 171, np.uint8))
    assert check_dataset("coco_stuff164k", root, show_progress=False)["problems"] == [
        f"{converted}: label values 171 outside the known set (0..170, 255)",
        f"coco_stuff164k: no image/label pairs for split 'val' under {root} ({root}/images/val2017/000000000139.jpg: "
        f"image without label (expected {root}/annotations/val2017/000000000139_labelTrainIds.png))"]


# --------------------------------------------------------------------------- PASCAL-Context 59

CONTEXT_LABELS = {
    "train": {"2008_000002": rows((0, 4), (37, 4), (59, 4)),  # background, person, wood
              "2008_000003": np.full((H, W), 1, np.uint8)},  # aeroplane
    "val": {"2008_000007": np.full((H, W), 59, np.uint8)},
}


def make_pascal_context(folder: Path) -> Path:
    """VOCdevkit/VOC2010 under `folder` as mmsegmentation's converter leaves it; returns `folder`."""
    voc = folder / "VOCdevkit" / "VOC2010"
    for seed, (split, labels) in enumerate(CONTEXT_LABELS.items()):
        for stem, label in labels.items():
            write_jpeg(voc / "JPEGImages" / f"{stem}.jpg", seed)
            write_label(voc / "SegmentationClassContext" / f"{stem}.png", label)
        (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text("".join(f"{s}\n" for s in labels))
    write_jpeg(voc / "JPEGImages" / "2008_000099.jpg", 9)  # a VOC image outside PASCAL-Context: no sample
    return folder


def test_pascal_context59_ignores_background_and_shifts_the_59_classes(tmp_path):
    root = make_pascal_context(tmp_path)
    assert PascalContext59.num_classes == len(PascalContext59.class_names) == len(PascalContext59.palette) == 59
    names = PascalContext59.class_names
    assert (names[0], names[36], names[58]) == ("aeroplane", "person", "wood")
    train, val = PascalContext59(root, "train"), PascalContext59(root, "val")
    assert (len(train), len(val)) == (2, 1) and train.orphans() == []
    assert pairs_of(train) == [("2008_000002.jpg", "2008_000002.png"), ("2008_000003.jpg", "2008_000003.png")]
    for i, (stem, raw) in enumerate(CONTEXT_LABELS["train"].items()):
        assert torch.equal(train.load(i)[1], torch.from_numpy(reduce_zero_label(raw)))
    mask = train.load(0)[1]
    assert (mask[:4] == 255).all() and (mask[4:8] == 36).all() and (mask[8:] == 58).all()
    assert (PascalContext59(root / "VOCdevkit" / "VOC2010", "val").load(0)[1] == 58).all()
    # mmsegmentation gives PASCAL-Context colours 1..59 of its ADE20K palette (colour 0 was background's)
    assert PascalContext59.palette == ADE20K.palette[1:60]


def test_pascal_context59_check_stats_and_one_line_failures(tmp_path, monkeypatch):
    root = make_pascal_context(tmp_path / "context")
    voc = root / "VOCdevkit" / "VOC2010"
    report = check_json("pascal_context59", root)
    assert report["splits"] == {"train": 2, "val": 1} and report["problems"] == []  # 2008_000099 is unlisted
    lists = voc / "ImageSets" / "SegmentationContext"
    assert report["sources"] == {"train": str(lists / "train.txt"), "val": str(lists / "val.txt")}
    assert report["warnings"] == [size_warning(lists / "train.txt", 2, "pascal_context59", "train", 4998),
                                  size_warning(lists / "val.txt", 1, "pascal_context59", "val", 5105)]
    monkeypatch.setenv("SDESBENCH_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["data", "stats", "pascal_context59", "--root", str(root), "--json"])
    assert res.exit_code == 0, res.output
    counts = json.loads(res.output)
    assert (counts["person"], counts["wood"], counts["aeroplane"]) == (4 * W, 4 * W, H * W)
    assert sum(counts.values()) == 8 * W + H * W

    (voc / "SegmentationClassContext" / "2008_000003.png").unlink()
    proc = run_cli("data", "check", "pascal_context59", "--root", str(root), "--no-progress")
    assert proc.returncode == 1
    assert problem_lines(proc.stderr) == [
        f"{voc}/JPEGImages/2008_000003.jpg: image without label "
        f"(expected {voc}/SegmentationClassContext/2008_000003.png)"]
    label = voc / "SegmentationClassContext" / "2008_000007.png"
    write_label(label, np.full((H, W), 60, np.uint8))
    write_label(voc / "SegmentationClassContext" / "2008_000003.png", CONTEXT_LABELS["train"]["2008_000003"])
    assert check_dataset("pascal_context59", root, show_progress=False)["problems"] == [
        f"{label}: label values 60 outside the known set (0..59, 255)"]


def test_list_datasets_names_the_three():
    res = CliRunner().invoke(app, ["list", "datasets"])
    assert res.exit_code == 0, res.output
    assert {"ade20k", "coco_stuff164k", "pascal_context59"} <= set(res.stdout.split())


# --------------------------------------------------------------------------- table specs

# (dataset, iterations, crop, batch, lr, {row: reference mIoU}), transcribed from winycg/CIRKD README.md and
# scripts at commit 91735ef3 and mmsegmentation 1.2.2's configs
PROTOCOLS = {
    "cirkd_ade20k": ("ade20k", 40000, [512, 512], 16, 0.02,
                     {"Baseline": 33.91, "KD": None, "CIRKD": 35.41, "Teacher": 42.70}),
    "cirkd_coco_stuff164k": ("coco_stuff164k", 80000, [512, 512], 16, 0.02,
                             {"Baseline": 32.60, "KD": None, "CIRKD": 33.11, "Teacher": 38.71}),
    "pascal_context59": ("pascal_context59", 80000, [480, 480], 16, 0.004,
                         {"Baseline": None, "KD": None, "Teacher": None}),
}


@pytest.mark.parametrize("table", sorted(PROTOCOLS))
def test_spec_protocols_reference_numbers_and_shared_teacher(table, tmp_path):
    dataset, iters, crop, batch, lr, reference = PROTOCOLS[table]
    spec = load_spec(table)
    assert {r.label: r.miou for g in spec.groups for r in g.rows} == reference
    plans = Sweep(table, "paper", (0,), tmp_path).plans(spec)
    assert all(p.cfg is not None for p in plans)
    for p in plans:
        c = p.cfg
        assert (c.data.name, c.train.iters, c.data.crop, c.data.batch_size, c.train.lr) == (dataset, iters, crop,
                                                                                             batch, lr)
        assert c.model.aux and c.model.pretrained and c.data.scale == [0.5, 2.0]
        if table == "pascal_context59":  # mmsegmentation's test_cfg: 480x480 windows every 320 pixels, on the
            # image resized to fit 520x520 keeping its aspect ratio (the test pipeline's Resize)
            assert (c.eval.mode, c.eval.crop, c.eval.stride) == ("slide", [480, 480], [320, 320])
            assert (c.eval.resize, c.eval.size) == ("keep_ratio", [520, 520])
    by_key = {p.key: p for p in plans}
    (teacher,) = [p for p in plans if p.is_teacher]
    kd = by_key["DeepLabV3-ResNet-18/KD"]
    # CIRKD's tables distil from CIRKD's own ResNet-101 DeepLabV3, Pascal Context (mmsegmentation's) from ours
    assert teacher.model == ("deeplabv3_resnet101" if table == "pascal_context59" else "deeplabv3_resnet101_cirkd")
    assert kd.cfg.method.name == "kl" and kd.cfg.teacher.model == teacher.model
    assert kd.depends_on == [str(teacher.out)]
    if "CIRKD" in reference:  # train_cirkd.py's objective, distilled from the same teacher run
        cirkd = by_key["DeepLabV3-ResNet-18/CIRKD"]
        assert cirkd.cfg.method.name == "cirkd+kd" and cirkd.depends_on == [str(teacher.out)]
    assert by_key["DeepLabV3-ResNet-101 (teacher)/Teacher"].out == teacher.out  # one run, two rows
    smoke = Sweep(table, "smoke", (0,), tmp_path).plans(spec)
    assert {p.cfg.data.name for p in smoke} == {"tiny"} and {p.cfg.train.iters for p in smoke} == {40}


def test_smoke_dry_run_lists_the_rows_without_training(tmp_path):
    proc = run_cli("run", "cirkd_ade20k", "--preset", "smoke", "--dry-run", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "5 planned rows/teachers, 4 distinct runs, 0 skipped; nothing was trained" in proc.stdout
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- bench at 171 classes


def test_bench_class_count_section_times_each_piece_at_both_counts():
    r = class_scaling(11, Runtime.create("cpu"), batch=1, crop=16, reps=1, eval_hw=(64, 64))
    assert r["classes"] == [11, MANY_CLASSES] == [11, 171] and r["image"] == [64, 64]
    names = [p["piece"] for p in r["pieces"]]
    assert len(names) == 11 and any(n.startswith("eval: confusion-matrix") for n in names)
    assert names[0] == "eval: whole evaluation, per image"
    assert any(n.startswith("data check") for n in names) and any(n.startswith("sdes: route") for n in names)
    for p in r["pieces"]:
        assert len(p["ms"]) == 2 and all(ms >= 0 for ms in p["ms"])
        if p["ms"][0] >= 1:  # the ratio is of the unrounded times
            assert p["ratio"] == pytest.approx(p["ms"][1] / p["ms"][0], rel=0.02)
    lines = format_class_scaling(r)
    assert "| piece | ms, 11 classes | ms, 171 classes | x |" in lines and len(lines) == 5 + len(names)
