"""Evaluation that keeps up with the device: loader workers and batches of equal-size images give the
metrics of batch 1 in the main process; `eval.workers` never changes a run's identity."""
import pytest
import torch

from conftest import CAMVID, camvid
from sdesbench.config import RunConfig
from sdesbench.data.base import EvalView, SizeGroupedBatches
from sdesbench.data.camvid import CamVid
from sdesbench.data.tiny import TinyScenes, render
from sdesbench.engine.configure import build_config
from sdesbench.engine.evaluate import eval_loader, evaluate
from sdesbench.engine.step import random_learner
from test_datasets import make_camvid

SIZES = [(64, 64), (48, 80), (64, 64), (56, 72), (48, 80), (64, 64), (64, 64)]


class MixedSizes(TinyScenes):
    """Tiny scenes of several sizes (VOC-like), in an order that interleaves them."""

    def __len__(self):
        return len(SIZES)

    def load(self, index):
        return render(1000 + index, *SIZES[index])

    def image_size(self, index):
        return SIZES[index]


def test_batches_hold_equal_sizes_in_order_and_every_index_once():
    batches = list(SizeGroupedBatches(range(len(SIZES)), SIZES.__getitem__, 2))
    # 64x64: 0, 2 (full), then 5, 6 (full); 48x80: 1, 4 (full); 56x72: 3 left over
    assert batches == [[0, 2], [1, 4], [5, 6], [3]]
    assert list(SizeGroupedBatches([6, 5, 3], SIZES.__getitem__, 4)) == [[6, 5], [3]]


def test_batched_evaluation_with_workers_equals_batch_one():
    torch.set_num_threads(1)
    learner = random_learner("deeplabv3_resnet18", "sdes", 11)  # extra prediction (Ens-T) too
    for view in (EvalView(MixedSizes(None, "val")), EvalView(TinyScenes(None, "val"), 9)):
        one = evaluate(learner.model, view, 11, torch.device("cpu"), method=learner.method)
        batched = evaluate(learner.model, view, 11, torch.device("cpu"), batch_size=3, method=learner.method,
                           workers=2)
        assert batched == one  # every metric of the student and of Ens-T, exactly
        assert set(one) == {"student", "ens_t"}


def test_eval_workers_default_to_data_workers_and_are_not_part_of_the_hash():
    base = build_config({}, ["data.workers=3"])
    assert base.eval.loader_workers(base.data) == 3
    own = build_config({}, ["data.workers=3", "eval.workers=0"])
    assert own.eval.loader_workers(own.data) == 0
    assert own.identity_hash() == base.identity_hash() == build_config({}).identity_hash()
    loader = eval_loader(EvalView(TinyScenes(None, "val"), 5), batch_size=2, workers=2)
    assert loader.num_workers == 2 and [len(b) for b in loader.batch_sampler] == [2, 2, 1]


def test_file_datasets_read_image_sizes_from_headers(tmp_path):
    ds = CamVid(make_camvid(tmp_path / "camvid"), "train")
    assert [ds.image_size(i) for i in range(len(ds))] == [tuple(ds.load(i)[0].shape[-2:]) for i in range(len(ds))]


@camvid
def test_real_camvid_sizes_from_headers():
    ds = CamVid(CAMVID, "val")
    assert all(ds.image_size(i) == tuple(ds.load(i)[0].shape[-2:]) == (360, 480) for i in range(0, len(ds), 25))


@pytest.mark.parametrize("batch", [1, 4])
def test_distributed_shards_are_batched_within_the_shard(monkeypatch, batch):
    from sdesbench.engine import distributed as D

    monkeypatch.setattr(D, "is_distributed", lambda: True)
    monkeypatch.setattr(D, "rank", lambda: 1)
    monkeypatch.setattr(D, "world_size", lambda: 2)
    loader = eval_loader(EvalView(MixedSizes(None, "val")), batch_size=batch)
    batches = [list(b) for b in loader.batch_sampler]
    assert sorted(i for b in batches for i in b) == [1, 3, 5]  # rank 1 of 2: every other image
    assert all(len({SIZES[i] for i in b}) == 1 for b in batches)


def test_eval_command_with_workers_reproduces_the_recorded_metrics(tmp_path):
    import json

    from conftest import run_cli
    from sdesbench.engine.trainer import train

    cfg = build_config({}, ["train.iters=1", "data.batch_size=2", "data.crop=32", "eval.max_images=30",
                            "eval.batch_size=4", f"output.dir={tmp_path / 'run'}"])
    rec = train(cfg, show_progress=False)
    proc = run_cli("eval", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--workers", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["miou"] == rec.metrics.miou and got["per_class_iou"] == list(rec.per_class_iou.values())
