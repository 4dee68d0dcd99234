"""What a checkpoint is evaluated on, said and checked: `sdesbench eval` names the dataset, split, folder
and number of images it scored; a folder given for the generated `tiny` dataset (which reads none) is a
one-line error in `eval`, `train` and `data check`, and a folder that does not exist is one line too."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from sdesbench.data.base import EvalView
from sdesbench.data.camvid import CamVid
from sdesbench.data.check import check_dataset
from sdesbench.engine.configure import build_config
from sdesbench.engine.evaluate import evaluate
from sdesbench.engine.restore import restore
from sdesbench.engine.trainer import train
from sdesbench.errors import DataError
from test_datasets import make_camvid, make_camvid_layout

SMALL = ["train.iters=2", "data.batch_size=2", "data.crop=32", "eval.max_images=2"]


def train_checkpoint(out, *sets):
    torch.set_num_threads(1)
    train(build_config({}, SMALL + list(sets) + [f"output.dir={out}"]), show_progress=False)
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture(scope="module")
def camvid_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("camvid")
    root = make_camvid(base / "camvid")  # train 2, val 1, no test split
    return train_checkpoint(base / "run", "data.name=camvid", f"data.root={root}"), root


def test_eval_names_the_generated_dataset_split_and_images(tiny_ckpt):
    proc = run_cli("eval", str(tiny_ckpt), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    # 30 val scenes: the size `tiny` is defined with (sdesbench/data/tiny.py docstring), not a count of the code's
    assert (report["dataset"], report["split"], report["root"], report["images"]) == ("tiny", "val", None, 30)
    proc = run_cli("eval", str(tiny_ckpt), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (f"{tiny_ckpt} (iteration 2) on tiny/val (generated, 30 images, input scale 1): "
            f"mIoU {100 * report['miou']:.2f}") in proc.stdout


@pytest.mark.parametrize("make_args", [
    lambda ckpt, folder: ["eval", str(ckpt), "--data-root", str(folder), "--split", "val"],  # an existing folder
    lambda ckpt, folder: ["eval", str(ckpt), "--data-root", "/nonexistent/folder"],
    lambda ckpt, folder: ["train", "--dataset", "tiny", "--data-root", str(folder), "--out", str(folder / "out")],
], ids=["eval-existing-folder", "eval-nonexistent-folder", "train-data-root"])
def test_a_folder_for_the_generated_dataset_is_one_line(tiny_ckpt, camvid_run, make_args):
    _, folder = camvid_run  # a real dataset's folder: what a user would mistakenly point the tiny run at
    assert_one_line_error(run_cli(*make_args(tiny_ckpt, folder)), "dataset 'tiny' is generated in code and reads "
                          f"no folder, yet one was given: ")
    assert not (folder / "out").exists()  # refused before anything was written


def test_data_root_for_tiny_fails_in_the_config_and_the_check(tmp_path):
    """`--set data.root=...` (tiny is the default dataset) and `data check tiny --root`, in process."""
    with pytest.raises(DataError, match="dataset 'tiny' is generated in code and reads no folder"):
        build_config({}, [f"data.root={tmp_path}"])
    with pytest.raises(DataError, match=f"yet one was given: {tmp_path}"):
        check_dataset("tiny", tmp_path, show_progress=False)
    assert build_config({}, ["data.name=camvid", f"data.root={tmp_path}"]).data.root == str(tmp_path)


def test_eval_names_the_folder_it_scored_and_reads_the_one_given(camvid_run, tmp_path):
    ckpt, root = camvid_run
    proc = run_cli("eval", str(ckpt), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["dataset"], report["split"], report["root"], report["images"]) == ("camvid", "val", str(root), 1)
    other = make_camvid_layout(tmp_path / "other", "segnet")  # has a test split (1 image); the training folder has none
    net = restore(ckpt)
    expected = evaluate(net.model, EvalView(CamVid(other, "test")), net.num_classes, torch.device("cpu"))["student"]
    proc = run_cli("eval", str(ckpt), "--data-root", str(other), "--split", "test", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert f"on camvid/test (at {other}, 1 images, input scale 1): mIoU {100 * expected['miou']:.2f}" in proc.stdout


def test_eval_on_a_folder_that_does_not_exist_is_one_line(camvid_run):
    ckpt, _ = camvid_run
    assert_one_line_error(run_cli("eval", str(ckpt), "--data-root", "/nonexistent/folder", "--split", "val"),
                          "dataset 'camvid': folder not found: /nonexistent/folder")
