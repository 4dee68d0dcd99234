"""DDP on CPU with gloo: sharded evaluation equals single-process evaluation; torchrun training writes one record."""
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data.distributed import DistributedSampler

from conftest import ROOT, cli_env, read_json
from sdesbench.data.base import EvalView
from sdesbench.data.tiny import TinyScenes
from sdesbench.engine import distributed as D
from sdesbench.io import load_checkpoint
from sdesbench.engine.evaluate import evaluate
from sdesbench.models import build_model

N_VAL = 7  # odd, so two ranks cannot split it evenly


def test_strided_shard_takes_every_index_exactly_once():
    shards = [list(D.StridedShard(N_VAL, r, 2)) for r in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    # torch's DistributedSampler would pad rank 1 with index 0 again: 8 images, one counted twice
    padded = [list(DistributedSampler(range(N_VAL), num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert sorted(padded[0] + padded[1]) == [0, 0, 1, 2, 3, 4, 5, 6]


def _fixed_model():
    torch.manual_seed(123)
    return build_model("deeplabv3_resnet18", TinyScenes.num_classes)


def _eval_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        metrics = evaluate(_fixed_model(), EvalView(TinyScenes(None, "val"), N_VAL), TinyScenes.num_classes,
                           torch.device("cpu"), per_image=True)
        assert len(D.shard_sampler(EvalView(TinyScenes(None, "val"), N_VAL))) == (4 if rank == 0 else 3)
        if rank == 0:
            torch.save(metrics, out_file)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_evaluate_exactly_like_one(tmp_path):
    single = evaluate(_fixed_model(), EvalView(TinyScenes(None, "val"), N_VAL), TinyScenes.num_classes,
                      torch.device("cpu"), per_image=True)
    out = tmp_path / "ddp.pt"
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=False)
    assert ddp["student"]["miou"] == single["student"]["miou"]
    assert ddp["student"]["pixel_acc"] == single["student"]["pixel_acc"]
    assert ddp["student"]["per_class_iou"] == single["student"]["per_class_iou"]
    # per-image counts gathered from both ranks, each image at its own index (rank 0: 0, 2, 4, 6; rank 1: 1, 3, 5)
    assert ddp["student"]["image_counts"].shape == (N_VAL, 3, TinyScenes.num_classes)
    assert torch.equal(ddp["student"]["image_counts"], single["student"]["image_counts"])


def test_torchrun_two_cpu_processes_train_and_write_one_record(tmp_path):
    out = tmp_path / "run"
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sdesbench",
           "train", "--iters", "2", "--device", "cpu", "--set", "data.batch_size=2", "--set", "data.crop=32",
           "--set", "eval.max_images=5", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results.json") == 1  # rank 0 alone reports
    rec = read_json(out / "results.json")
    assert rec["status"] == "completed" and rec["world_size"] == 2 and rec["iterations"] == 2
    assert [p.name for p in out.glob("**/results*.json")] == ["results.json"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 1  # log_every 10 -> only the last iteration
    # the record's metric is the single-process metric of the checkpoint rank 0 saved
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["iteration"] == 2
    model = build_model("deeplabv3_resnet18", TinyScenes.num_classes)
    model.load_state_dict(state["model"])
    single = evaluate(model, EvalView(TinyScenes(None, "val"), 5), TinyScenes.num_classes, torch.device("cpu"))
    assert rec["metrics"]["miou"] == single["student"]["miou"]
    assert list(rec["per_class_iou"].values()) == single["student"]["per_class_iou"]
