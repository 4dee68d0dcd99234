"""Real-dataset loaders (CamVid, Cityscapes, VOC) on small generated fixtures in their on-disk
layouts, the dataset checker (every problem it reports), and the real CamVid copy when present."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CAMVID, assert_one_line_error, camvid, run_cli
from sdesbench.data.base import TrainView, class_pixel_counts
from sdesbench.data.camvid import CamVid
from sdesbench.data.check import check_dataset, ensure_checked
from sdesbench.data.cityscapes import Cityscapes
from sdesbench.data.voc import PALETTE as VOC_PALETTE
from sdesbench.data.voc import PascalVOC
from sdesbench.errors import DataError

H, W = 24, 32


def write_image(path, seed, size=(H, W), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format=fmt)
    return rgb


def write_label(path, values, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(values, dtype=np.uint8), mode="L")
    if palette is not None:  # a palette PNG as in VOC's SegmentationClass
        im = im.convert("P")
        im.putpalette([c for rgb in palette for c in rgb] + [224, 224, 192] * (256 - len(palette)))
        im.putdata(np.asarray(values, dtype=np.uint8).flatten().tolist())
    im.save(path)


def camvid_label_a():
    """Rows 0-11 Sky (0), rows 12-22 Road (3), row 23 void (11): 384 + 352 labelled pixels."""
    lab = np.zeros((H, W), np.uint8)
    lab[12:23] = 3
    lab[23] = 11
    return lab


def camvid_label_b():
    """Car (8) everywhere but the first column, which is void: 23 * 32 + 23 = 744 labelled pixels."""
    lab = np.full((H, W), 8, np.uint8)
    lab[:, 0] = 11
    return lab


def make_camvid(root):
    """SegNet layout, with list files holding absolute paths from another machine."""
    for split, names in (("train", ["0001TP_a.png", "0001TP_b.png"]), ("val", ["Seq05_c.png"])):
        for i, name in enumerate(names):
            write_image(root / split / name, seed=i)
            write_label(root / f"{split}annot" / name, camvid_label_a() if i == 0 else camvid_label_b())
        (root / f"{split}.txt").write_text("".join(
            f"/SegNet/CamVid/{split}/{n} /SegNet/CamVid/{split}annot/{n}\n" for n in names))
    return root


def camvid_label_c():
    """Road (3) in the left 20 columns, Pavement (4) in the right 12: 480 + 288 labelled pixels."""
    lab = np.full((H, W), 3, np.uint8)
    lab[:, 20:] = 4
    return lab


CAMVID_SPLITS = {"train": [("0001TP_b.png", camvid_label_b), ("0001TP_a.png", camvid_label_a)],  # list order != sorted
                 "val": [("Seq05_c.png", camvid_label_a)], "test": [("Seq05_t.png", camvid_label_c)]}


def make_camvid_layout(root, layout: str):
    """All three splits; lists in SegNet's form (train.txt ..., absolute foreign paths, no trainval list) or
    in CIRKD's (camvid_<split>_list.txt with root-relative paths, trainval included) in the folder `layout`
    names: "cirkd" (root), "cirkd:list" or "cirkd:list/CamVid". An unlisted pair in train/ is no sample."""
    for split, samples in CAMVID_SPLITS.items():
        for i, (name, label) in enumerate(samples):
            write_image(root / split / name, seed=10 * len(split) + i)
            write_label(root / f"{split}annot" / name, label())
    write_image(root / "train" / "0001TP_unlisted.png", seed=99)
    write_label(root / "trainannot" / "0001TP_unlisted.png", camvid_label_c())
    lines = {s: [f"{s}/{n} {s}annot/{n}" for n, _ in samples] for s, samples in CAMVID_SPLITS.items()}
    if layout == "segnet":
        for split, entries in lines.items():
            (root / f"{split}.txt").write_text("".join(f"/SegNet/CamVid/{e.replace(' ', ' /SegNet/CamVid/')}\n"
                                                       for e in entries))
        return root
    folder = root.joinpath(*layout.split(":")[1:])
    folder.mkdir(parents=True, exist_ok=True)
    lines["trainval"] = lines["train"] + lines["val"]
    for split, entries in lines.items():
        (folder / f"camvid_{split}_list.txt").write_text("".join(f"{e}\n" for e in entries))
    return root


@pytest.mark.parametrize("layout", ["segnet", "cirkd", "cirkd:list", "cirkd:list/CamVid"])
def test_camvid_splits_from_segnet_and_cirkd_lists_load_and_check(tmp_path, layout):
    root = make_camvid_layout(tmp_path / "CamVid", layout)
    if layout == "segnet":
        assert (root / "train.txt").read_text().startswith(
            "/SegNet/CamVid/train/0001TP_b.png /SegNet/CamVid/trainannot/0001TP_b.png\n")
    else:  # CIRKD's form: dataset/list/CamVid/camvid_train_list.txt of winycg/CIRKD
        assert root.joinpath(*layout.split(":")[1:], "camvid_train_list.txt").read_text().startswith(
            "train/0001TP_b.png trainannot/0001TP_b.png\n")
    names = {s: [CamVid(root, s).pairs[i][0].relative_to(root).as_posix() for i in range(len(CamVid(root, s)))]
             for s in CamVid.splits}
    assert names == {"train": ["train/0001TP_b.png", "train/0001TP_a.png"], "val": ["val/Seq05_c.png"],
                     "test": ["test/Seq05_t.png"],
                     "trainval": ["train/0001TP_b.png", "train/0001TP_a.png", "val/Seq05_c.png"]}
    trainval = CamVid(root, "trainval")
    assert [lab.relative_to(root).as_posix() for _, lab in trainval.pairs] == [
        "trainannot/0001TP_b.png", "trainannot/0001TP_a.png", "valannot/Seq05_c.png"]
    image, mask = CamVid(root, "test").load(0)
    expected_rgb = np.random.default_rng(40).integers(0, 256, (H, W, 3), dtype=np.uint8)
    assert torch.equal(image, torch.from_numpy(expected_rgb).permute(2, 0, 1))
    assert (mask[:, :20] == 3).all() and (mask[:, 20:] == 4).all()
    assert (trainval.load(2)[1][23] == 255).all()  # the val label's void row

    proc = run_cli("data", "check", "camvid", "--root", str(root), "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["problems"] == [] and report["warnings"] == [] and proc.stderr == ""
    assert report["splits"] == {"train": 2, "val": 1, "test": 1, "trainval": 3}
    # labels a (Sky 384, Road 352) and b (Car 744) in train, a again in val; c (Road 480, Pavement 288) in test
    share = report["class_pixel_share"]
    assert share["trainval"]["Sky"] == pytest.approx(2 * 384 / (2 * 736 + 744))
    assert share["trainval"]["Car"] == pytest.approx(744 / (2 * 736 + 744))
    assert share["test"]["Road"] == pytest.approx(480 / 768) and share["test"]["Pavement"] == pytest.approx(288 / 768)


def test_camvid_list_problems_and_absent_test_split(tmp_path):
    root = make_camvid_layout(tmp_path / "CamVid", "cirkd:list/CamVid")
    lists = root / "list" / "CamVid"
    with open(lists / "camvid_test_list.txt", "a") as f:
        f.write("test/Seq05_gone.png testannot/Seq05_gone.png\n")  # listed, missing
        f.write("test/Seq05_t.png valannot/Seq05_c.png\n")  # a label that is not the image's
    report = check_dataset("camvid", root, show_progress=False)
    assert report["problems"] == [
        f"{lists}/camvid_test_list.txt:3: label valannot/Seq05_c.png does not belong to image test/Seq05_t.png "
        "(expected testannot/Seq05_t.png)",
        f"{root}/test/Seq05_gone.png: listed in {lists}/camvid_test_list.txt but missing"]
    assert report["splits"]["test"] == 1
    # without test/ and a test list the split is absent: optional for the checker, one clear line for a run
    for p in (root / "test").iterdir():
        p.unlink()
    (root / "test").rmdir()
    (lists / "camvid_test_list.txt").unlink()
    report = check_dataset("camvid", root, show_progress=False)
    assert report["problems"] == [] and set(report["splits"]) == {"train", "val", "trainval"}
    with pytest.raises(DataError, match=re.escape(f"camvid: split 'test' not found under {root} (no test/ folder, "
                                                  "no test.txt or camvid_test_list.txt)")):
        CamVid(root, "test")


def test_check_warns_about_grey_and_rgba_images_and_still_passes(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    grey = np.random.default_rng(7).integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(root / "train" / "0001TP_a.png")
    rgba = np.random.default_rng(8).integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(root / "val" / "Seq05_c.png")
    proc = run_cli("data", "check", "camvid", "--root", str(root), "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["problems"] == []
    assert report["warnings"] == [
        f"{root}/train/0001TP_a.png: image is mode L (greyscale, its grey level copied to R, G and B); "
        "converted to RGB when loaded",
        f"{root}/val/Seq05_c.png: image is mode RGBA (RGB with alpha, alpha dropped); converted to RGB when loaded"]
    assert proc.stderr.splitlines() == [f"warning: {w}" for w in report["warnings"]]
    assert report["class_pixel_share"]["val"]["Sky"] == pytest.approx(384 / 736)  # the labels are read as before
    # converted as before: grey copied to three channels, alpha dropped
    assert torch.equal(CamVid(root, "train").load(0)[0], torch.from_numpy(grey).expand(3, H, W))
    assert torch.equal(CamVid(root, "val").load(0)[0], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))
    ensure_checked(CamVid(root, "train"), CamVid(root, "val"), tmp_path / "cache")  # warnings do not stop training
    text = run_cli("data", "check", "camvid", "--root", str(root), "--no-progress")
    assert text.returncode == 0 and "0 problem(s), 2 warning(s) found" in text.stdout


def test_camvid_loader_maps_void_to_ignore_and_uses_list_file_names(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    ds = CamVid(root, "train")
    assert len(ds) == 2 and ds.orphans() == []
    assert ds.sample_id(0) == str(root / "train" / "0001TP_a.png")  # the list's foreign path is not used
    image, mask = ds.load(0)
    assert image.dtype == torch.uint8 and image.shape == (3, H, W)
    expected_rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    assert torch.equal(image, torch.from_numpy(expected_rgb).permute(2, 0, 1))
    assert mask.dtype == torch.int64 and mask.shape == (H, W)
    assert (mask[:12] == 0).all() and (mask[12:23] == 3).all() and (mask[23] == 255).all()
    assert len(CamVid(root, "val")) == 1
    with pytest.raises(DataError, match="unknown split 'tset'"):
        CamVid(root, "tset")


def test_cityscapes_maps_label_ids_to_train_ids_and_prefers_label_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    ids = np.zeros((H, W), np.uint8)  # 0 = unlabeled -> 255
    ids[:8] = 7  # road -> 0
    ids[8:16] = 26  # car -> 13
    ids[16:20] = 33  # bicycle -> 18
    ids[20:] = 14  # guard rail: a valid id that is not evaluated -> 255
    ids[23, :4] = 0
    for split, city in (("train", "aachen"), ("val", "lindau")):
        stem = f"{city}/{city}_000000_000019"
        write_image(root / "leftImg8bit" / split / f"{stem}_leftImg8bit.png", seed=1)
        write_label(root / "gtFine" / split / f"{stem}_gtFine_labelIds.png", ids)
    # a second train city with both label files: the labelTrainIds file wins
    stem = "bremen/bremen_000001_000019"
    write_image(root / "leftImg8bit" / "train" / f"{stem}_leftImg8bit.png", seed=2)
    write_label(root / "gtFine" / "train" / f"{stem}_gtFine_labelIds.png", np.full((H, W), 7, np.uint8))
    train_ids = np.full((H, W), 13, np.uint8)
    train_ids[:5] = 255
    write_label(root / "gtFine" / "train" / f"{stem}_gtFine_labelTrainIds.png", train_ids)

    ds = Cityscapes(root, "train")
    assert len(ds) == 2 and ds.orphans() == []
    assert [p[0].parent.name for p in ds.pairs] == ["aachen", "bremen"]
    _, mask = ds.load(0)
    assert (mask[:8] == 0).all() and (mask[8:16] == 13).all() and (mask[16:20] == 18).all()
    assert (mask[20:] == 255).all()
    _, mask = ds.load(1)
    assert (mask[:5] == 255).all() and (mask[5:] == 13).all()
    assert len(Cityscapes(root, "val")) == 1
    report = check_dataset("cityscapes", root, show_progress=False)  # the absent test split is optional
    assert report["problems"] == [] and report["splits"] == {"train": 2, "val": 1}
    share = report["class_pixel_share"]["train"]
    total = 8 * W + 8 * W + 4 * W + 19 * W  # road, car, bicycle rows of image 1; car rows of image 2
    assert share["road"] == pytest.approx(8 * W / total) and share["car"] == pytest.approx((8 + 19) * W / total)
    assert share["bicycle"] == pytest.approx(4 * W / total) and share["sidewalk"] == 0


def make_voc(root, aug: bool):
    """VOC2012: palette PNGs in SegmentationClass; with `aug`, SBD grey labels and a DeepLab-style list."""
    lab = np.zeros((H, W), np.uint8)
    lab[4:20, 6:26] = 15  # person
    lab[4, 6:26] = 255  # object boundary
    ids = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033"]}
    for split, names in ids.items():
        for i, name in enumerate(names):
            write_image(root / "JPEGImages" / f"{name}.jpg", seed=i, fmt="JPEG")
            write_label(root / "SegmentationClass" / f"{name}.png", lab, palette=VOC_PALETTE)
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    if aug:
        extra = "2008_000002"
        write_image(root / "JPEGImages" / f"{extra}.jpg", seed=5, fmt="JPEG")
        write_label(root / "SegmentationClassAug" / f"{extra}.png", np.full((H, W), 7, np.uint8))  # grey, car
        (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("".join(
            f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in ids["train"] + [extra]))
    return root


def test_voc_reads_palette_indices_not_colours_and_trainaug_is_its_own_split(tmp_path):
    root = make_voc(tmp_path / "VOCdevkit" / "VOC2012", aug=False)
    assert Image.open(root / "SegmentationClass" / "2007_000032.png").mode == "P"
    ds = PascalVOC(tmp_path, "train")  # the folder above VOCdevkit works too
    assert len(ds) == 2
    image, mask = ds.load(0)
    assert image.shape == (3, H, W) and image.dtype == torch.uint8
    assert (mask[5:20, 6:26] == 15).all() and (mask[4, 6:26] == 255).all() and int((mask == 0).sum()) == H * W - 16 * 20
    make_voc(root, aug=True)
    assert len(PascalVOC(root, "train")) == 2  # VOC's own 1,464-image list: never replaced by the augmented one
    ds = PascalVOC(root, "trainaug")
    assert len(ds) == 3 and ds.sample_id(2).endswith("JPEGImages/2008_000002.jpg")
    assert (ds.load(2)[1] == 7).all() and ds.source() == str(root / "ImageSets" / "Segmentation" / "train_aug.txt")
    assert len(PascalVOC(root, "val")) == 1


def person_with_border():
    """A VOC-style label: person (15) box whose top row is the 255 boundary band: 20 ignored pixels."""
    lab = np.zeros((H, W), np.uint8)
    lab[4:20, 6:26] = 15
    lab[4, 6:26] = 255
    return lab


VOC_TRAIN, VOC_VAL, SBD_ONLY = ["2007_000032", "2007_000039"], ["2007_000033"], ["2008_000002", "2008_000003"]


def make_voc_aug(root):
    """VOC 2012 + SBD as mmsegmentation's voc_aug.py leaves it, every label distinct so that the test can
    tell which folder a split read: SegmentationClass (palette PNGs with the boundary band) for VOC's
    train and val ids; SegmentationClassAug (grey, no band) for one VOC train id, the SBD-only ids and
    the VOC val id (SBD labels it too). No trainaug list yet: the tests add the one they look at."""
    for i, name in enumerate(VOC_TRAIN + VOC_VAL + SBD_ONLY):
        write_image(root / "JPEGImages" / f"{name}.jpg", seed=i, fmt="JPEG")
    for name in VOC_TRAIN + VOC_VAL:
        write_label(root / "SegmentationClass" / f"{name}.png", person_with_border(), palette=VOC_PALETTE)
    for name, value in (("2007_000032", 7), ("2007_000033", 12), ("2008_000002", 8), ("2008_000003", 3)):
        write_label(root / "SegmentationClassAug" / f"{name}.png", np.full((H, W), value, np.uint8))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    for split, names in (("train", VOC_TRAIN), ("val", VOC_VAL)):
        (lists / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def test_voc_val_scores_on_the_original_labels_train_reads_the_sbd_ones(tmp_path):
    root = make_voc_aug(tmp_path / "VOC2012")
    (root / "ImageSets" / "Segmentation" / "trainaug.txt").write_text("".join(f"{n}\n" for n in VOC_TRAIN + SBD_ONLY))
    val = PascalVOC(root, "val")
    assert [p[1] for p in val.pairs] == [root / "SegmentationClass" / "2007_000033.png"]
    mask = val.load(0)[1]
    assert torch.equal(mask, torch.from_numpy(person_with_border()).long())  # not SBD's all-dog label
    assert int((mask == 255).sum()) == 20  # the boundary band is there to be ignored
    trainaug = PascalVOC(root, "trainaug")
    assert [p[1].parent.name for p in trainaug.pairs] == ["SegmentationClassAug", "SegmentationClass",
                                                          "SegmentationClassAug", "SegmentationClassAug"]
    assert (trainaug.load(0)[1] == 7).all()  # the SBD label wins where both folders hold the id
    assert torch.equal(trainaug.load(1)[1], torch.from_numpy(person_with_border()).long())  # SBD lacks it
    assert (trainaug.load(2)[1] == 8).all() and (trainaug.load(3)[1] == 3).all()
    train = PascalVOC(root, "train")  # VOC's own split, on VOC's own labels
    assert [p[1].parent.name for p in train.pairs] == ["SegmentationClass", "SegmentationClass"]
    (root / "SegmentationClass" / "2007_000033.png").unlink()  # val never falls back to the SBD label
    with pytest.raises(DataError, match="image without label .*SegmentationClass/2007_000033.png"):
        PascalVOC(root, "val")


@pytest.mark.parametrize("rel", ["ImageSets/Segmentation/trainaug.txt",  # mmsegmentation's voc_aug.py
                                 "ImageSets/Segmentation/train_aug.txt", "ImageSets/SegmentationAug/train_aug.txt",
                                 "train_aug.txt", "list/voc/train_aug.txt"])  # CIRKD's dataset/list/voc/
def test_voc_trainaug_list_names_of_the_common_tools(tmp_path, rel):
    root = make_voc_aug(tmp_path / "VOC2012")
    ids = VOC_TRAIN + SBD_ONLY
    lines = [f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png" for n in ids] if "Aug/" in rel else ids
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text("\n".join(lines) + "\n")
    ds = PascalVOC(root, "trainaug")
    assert [p[0].stem for p in ds.pairs] == ids and ds.source() == str(root / rel)


def test_voc_trainaug_from_mmsegmentation_train_and_aug_lists(tmp_path):
    """mmsegmentation's aug.txt holds the SBD ids outside VOC train and val; with train.txt it is trainaug."""
    root = make_voc_aug(tmp_path / "VOC2012")
    lists = root / "ImageSets" / "Segmentation"
    (lists / "aug.txt").write_text("".join(f"{n}\n" for n in SBD_ONLY))
    ds = PascalVOC(root, "trainaug")
    assert [p[0].stem for p in ds.pairs] == VOC_TRAIN + SBD_ONLY
    assert ds.source() == f"{lists / 'train.txt'} + {lists / 'aug.txt'}"


def test_voc_without_an_augmented_list_names_every_file_looked_for(tmp_path):
    root = make_voc_aug(tmp_path / "VOC2012")
    with pytest.raises(DataError) as e:
        PascalVOC(root, "trainaug")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"voc: no list file for split 'trainaug' (the 10,582")
    for rel in ("ImageSets/Segmentation/trainaug.txt", "ImageSets/Segmentation/train_aug.txt",
                "ImageSets/SegmentationAug/train_aug.txt", "train_aug.txt", "list/voc/train_aug.txt",
                "ImageSets/Segmentation/train.txt followed by ImageSets/Segmentation/aug.txt"):
        assert rel in message, message
    report = check_dataset("voc", root, show_progress=False)  # the check passes, and says what is missing
    assert report["problems"] == [] and report["splits"] == {"train": 2, "val": 1}
    assert f"{message} (a paper protocol trains or evaluates on it)" in report["warnings"]


def test_voc_check_cli_names_each_split_list_and_its_size(tmp_path):
    root = make_voc_aug(tmp_path / "VOC2012")
    lists = root / "ImageSets" / "Segmentation"
    (lists / "trainaug.txt").write_text("".join(f"{n}\n" for n in VOC_TRAIN + SBD_ONLY))
    proc = run_cli("data", "check", "voc", "--root", str(root), "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["splits"] == {"train": 2, "trainaug": 4, "val": 1} and report["problems"] == []
    assert report["sources"] == {"train": str(lists / "train.txt"), "trainaug": str(lists / "trainaug.txt"),
                                 "val": str(lists / "val.txt")}
    assert report["warnings"] == [f"{lists / 'train.txt'}: 2 id(s); VOC 2012's standard train list holds 1,464",
                                  f"{lists / 'trainaug.txt'}: 4 id(s); the standard trainaug list holds 10,582",
                                  f"{lists / 'val.txt'}: 1 id(s); VOC 2012's standard val list holds 1,449"]
    proc = run_cli("data", "check", "voc", "--root", str(root), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"trainaug: 4 images from {lists / 'trainaug.txt'}" in proc.stdout.splitlines()
    assert f"val: 1 images from {lists / 'val.txt'}" in proc.stdout.splitlines()


def test_table1_paper_trains_on_trainaug_and_refuses_to_start_without_it(tmp_path, monkeypatch):
    from sdesbench.experiments.plan import Sweep

    plans = Sweep("table1", "paper", (0,), tmp_path / "results").plans()
    assert {(p.cfg.data.train_split, p.cfg.data.eval_split) for p in plans} == {("trainaug", "val")}
    make_voc_aug(tmp_path / "data" / "voc" / "VOCdevkit" / "VOC2012")  # VOC + SBD labels, but no trainaug list
    monkeypatch.setenv("SDESBENCH_DATA", str(tmp_path / "data"))
    proc = run_cli("run", "table1", "--preset", "paper", "--results", str(tmp_path / "results"), "--no-progress")
    assert_one_line_error(proc, "voc: no list file for split 'trainaug'", "ImageSets/Segmentation/trainaug.txt",
                          "list/voc/train_aug.txt")
    assert not list((tmp_path / "results").glob("runs/*"))  # no run started


def test_check_json_counts_and_hand_computed_shares_via_cli(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    proc = run_cli("data", "check", "camvid", "--root", str(root), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) == {"splits", "sources", "class_pixel_share", "problems", "warnings"}
    assert report["splits"] == {"train": 2, "val": 1, "trainval": 3} and report["problems"] == []
    assert report["sources"] == {"train": f"{root}/train.txt", "val": f"{root}/val.txt",
                                 "trainval": f"{root}/train.txt + {root}/val.txt"}  # no list of its own
    train = report["class_pixel_share"]["train"]
    total = 384 + 352 + 744  # labelled pixels of labels a and b (void excluded)
    assert train["Sky"] == pytest.approx(384 / total) and train["Road"] == pytest.approx(352 / total)
    assert train["Car"] == pytest.approx(744 / total) and train["Pole"] == 0
    assert report["class_pixel_share"]["val"]["Sky"] == pytest.approx(384 / 736)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_checker_reports_every_problem_one_line_each_naming_the_file(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    write_image(root / "train" / "extra_no_label.png", seed=3)  # image without label
    write_label(root / "trainannot" / "orphan.png", camvid_label_a())  # label without image
    (root / "val" / "Seq05_c.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # corrupt image
    truncate(root / "trainannot" / "0001TP_a.png")  # truncated label
    write_image(root / "val" / "Seq05_d.png", seed=4)
    write_label(root / "valannot" / "Seq05_d.png", np.full((H + 2, W), 3, np.uint8))  # size mismatch
    with open(root / "val.txt", "a") as f:
        f.write("/SegNet/CamVid/val/Seq05_d.png /SegNet/CamVid/valannot/Seq05_d.png\n")
    with open(root / "train.txt", "a") as f:
        f.write("/SegNet/CamVid/train/gone.png /SegNet/CamVid/trainannot/gone.png\n")  # listed, missing
    bad = camvid_label_b()
    bad[0, 5], bad[1, 7] = 40, 12  # values outside 0..11 and 255
    write_label(root / "trainannot" / "0001TP_b.png", bad)

    proc = run_cli("data", "check", "camvid", "--root", str(root), "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    lines = proc.stderr.strip().splitlines()
    assert lines == report["problems"] and "Traceback" not in proc.stderr
    expected = [
        f"{root}/train/gone.png: listed in {root}/train.txt but missing",
        f"{root}/train/extra_no_label.png: image without label (expected {root}/trainannot/extra_no_label.png)",
        f"{root}/trainannot/orphan.png: label without image (expected {root}/train/orphan.png)",
        f"{root}/trainannot/0001TP_b.png: label values 12, 40 outside the known set (0..11, 255)",
        f"{root}/valannot/Seq05_d.png: size mismatch: label 32x26, image 32x24 (Seq05_d.png)",
    ]
    for line in expected:
        assert line in lines, (line, lines)
    truncated = [x for x in lines if x.startswith(f"cannot read label {root}/trainannot/0001TP_a.png: ")]
    assert len(truncated) == 1 and "truncated" in truncated[0]
    assert any(x.startswith(f"cannot read image {root}/val/Seq05_c.png: ") for x in lines), lines
    assert len(lines) == 7
    assert report["splits"] == {"train": 2, "val": 2, "trainval": 4}


def test_checker_reports_truncated_image_rgb_label_and_missing_split(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    truncate(root / "train" / "0001TP_a.png")
    rgb = np.zeros((H, W, 3), np.uint8)
    Image.fromarray(rgb).save(root / "trainannot" / "0001TP_b.png")  # a colour label, not class indices
    for p in (root / "val").iterdir():
        p.unlink()
    (root / "val").rmdir()
    (root / "val.txt").unlink()
    report = check_dataset("camvid", root, show_progress=False)
    first = report["problems"].pop(0)
    assert first.startswith(f"cannot read image {root}/train/0001TP_a.png: image file is truncated"), first
    assert report["problems"] == [
        f"label {root}/trainannot/0001TP_b.png is a RGB image; expected 8-bit class indices (mode L or P)",
        f"{root}: split 'val' not found",
    ]
    assert report["splits"] == {"train": 2}  # no val: no trainval either


def test_cityscapes_and_voc_orphans(tmp_path):
    cs = tmp_path / "cityscapes"
    write_image(cs / "leftImg8bit" / "train" / "ulm" / "ulm_000000_000019_leftImg8bit.png", seed=0)
    write_label(cs / "gtFine" / "train" / "ulm" / "ulm_000000_000019_gtFine_labelIds.png", np.full((H, W), 7))
    write_image(cs / "leftImg8bit" / "train" / "ulm" / "ulm_000001_000019_leftImg8bit.png", seed=1)
    write_label(cs / "gtFine" / "train" / "ulm" / "ulm_000002_000019_gtFine_labelTrainIds.png", np.zeros((H, W)))
    ds = Cityscapes(cs, "train")
    gt = cs / "gtFine" / "train" / "ulm"
    assert ds.orphans() == [
        f"{cs}/leftImg8bit/train/ulm/ulm_000001_000019_leftImg8bit.png: image without label "
        f"(expected {gt}/ulm_000001_000019_gtFine_labelIds.png)",
        f"{gt}/ulm_000002_000019_gtFine_labelTrainIds.png: label without image "
        f"(expected {cs}/leftImg8bit/train/ulm/ulm_000002_000019_leftImg8bit.png)"]

    voc = make_voc(tmp_path / "voc", aug=False)
    (voc / "SegmentationClass" / "2007_000039.png").unlink()
    (voc / "JPEGImages" / "2007_000033.jpg").unlink()
    write_image(voc / "JPEGImages" / "2009_999999.jpg", seed=9, fmt="JPEG")  # unlabelled by design: no problem
    report = check_dataset("voc", voc, show_progress=False)
    assert report["problems"] == [
        f"{voc}/JPEGImages/2007_000039.jpg: image without label (expected {voc}/SegmentationClass/2007_000039.png)",
        f"voc: no image/label pairs for split 'val' under {voc} "
        f"({voc}/JPEGImages/2007_000033.jpg: listed in {voc}/ImageSets/Segmentation/val.txt but missing)",
    ]


def test_training_refuses_bad_data_and_rechecks_a_replaced_file(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    train, val = CamVid(root, "train"), CamVid(root, "val")
    ensure_checked(train, val, tmp_path / "cache")  # passes, cached with the class pixel counts
    assert len(list((tmp_path / "cache").glob("check-camvid-*.json"))) == 2
    assert (tmp_path / "cache" / f"stats-camvid-train-{train.fingerprint()}.pt").is_file()
    assert class_pixel_counts(train, tmp_path / "cache").tolist() == [384, 0, 0, 352, 0, 0, 0, 0, 744, 0, 0]
    label = root / "trainannot" / "0001TP_b.png"
    bad = camvid_label_b()
    bad[3, 3] = 99
    write_label(label, bad)
    train = CamVid(root, "train")  # same file names, new content: the fingerprint changes
    with pytest.raises(DataError, match=re.escape(f"dataset check failed: {label}: label values 99 outside")):
        ensure_checked(train, val, tmp_path / "cache")
    # a file that becomes unreadable mid-run is reported with its path
    truncate(root / "train" / "0001TP_a.png")
    with pytest.raises(DataError, match=re.escape(f"cannot read image {root}/train/0001TP_a.png")):
        TrainView(train, [16, 16], [1.0, 1.0], True)[(0, 1)]


def test_missing_root_is_one_line(tmp_path):
    with pytest.raises(DataError, match=f"dataset 'cityscapes': folder not found: {tmp_path}/nope"):
        check_dataset("cityscapes", tmp_path / "nope")


def test_stats_cli_counts_pixels_and_caches_by_fingerprint(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sdesbench.cli import app

    root = make_camvid(tmp_path / "camvid")
    monkeypatch.setenv("SDESBENCH_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, ["data", "stats", "camvid", "--root", str(root), "--json"])
    assert res.exit_code == 0, res.output
    counts = json.loads(res.output)
    assert counts["Sky"] == 384 and counts["Road"] == 352 and counts["Car"] == 744 and sum(counts.values()) == 1480
    assert len(list((tmp_path / "cache").glob("stats-camvid-train-*.pt"))) == 1


def readme_shares():
    """{split: {class: fraction of labelled pixels}} from the README table (percent of all pixels)."""
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \|$", (CAMVID / "README.md").read_text(), re.M)
    table = {name: (float(a), float(b)) for name, a, b in rows}
    void = table.pop("void")
    return {split: {name: v[j] / (100 - void[j]) for name, v in table.items()} for j, split in enumerate(("train", "val"))}


@camvid
def test_real_camvid_check_matches_readme():
    proc = run_cli("data", "check", "camvid", "--root", "../shared/data/camvid", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    has_test = (CAMVID / "test").is_dir()  # the shared copy withholds it
    assert report["splits"] == {"train": 367, "val": 101, "trainval": 468} | ({"test": 233} if has_test else {})
    assert report["problems"] == []
    expected = readme_shares()
    for split in ("train", "val"):
        share = report["class_pixel_share"][split]
        assert sum(share.values()) == pytest.approx(1.0, abs=1e-9)
        for name, value in expected[split].items():
            assert abs(share[name] - value) < 0.001, (split, name, share[name], value)


@camvid
def test_short_camvid_training_on_cpu(tmp_path):
    proc = run_cli("train", "--dataset", "camvid", "--data-root", str(CAMVID), "--iters", "2", "--device", "cpu",
                   "--out", str(tmp_path / "run"), "--set", "data.crop=64", "--set", "data.batch_size=2",
                   "--set", "eval.max_images=2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rec["status"] == "completed" and rec["iterations"] == 2
    assert len(rec["per_class_iou"]) == 11


def test_throughput_runs_the_training_transform(tmp_path):
    from sdesbench.measure.throughput import loader_throughput

    r = loader_throughput(CamVid(make_camvid(tmp_path / "camvid"), "train"), crop=(16, 16), n=4)
    assert r["images"] == 4 and r["images_per_s"] == pytest.approx(4 / r["seconds"])
    assert r["per_worker"] == r["images_per_s"] and r["per_cpu_s"] > 0
