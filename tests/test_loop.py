"""Watching a run: periodic evaluation (`eval.every`) without changing the training, its history and
best in the record, TensorBoard scalars equal to log.jsonl, per-image counts that reproduce the final
metrics, and `sdesbench show`."""
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_line_error, run_cli
from sdesbench.engine.configure import build_config
from sdesbench.engine.metrics import ConfusionMatrix, image_counts
from sdesbench.engine.record import read_image_counts, read_record
from sdesbench.engine.trainer import train
from sdesbench.engine.rescore import evaluate_checkpoint
from sdesbench.errors import ConfigError, SdesbenchError
from sdesbench.io import load_checkpoint
from sdesbench.report.stats import miou_of_counts, pixel_acc_of_counts

# SDES with light experts: a student, method modules with BatchNorm, and an extra prediction (Ens-T)
TINY = ["train.iters=4", "data.batch_size=2", "data.crop=32", "eval.max_images=3", "train.log_every=1",
        "train.checkpoint_every=2"]
SDES = {"method": {"name": "sdes", "expert": "light", "n_experts": 2}}


def tiny_run(folder, *sets):
    torch.set_num_threads(1)
    cfg = build_config(SDES, TINY + list(sets) + [f"output.dir={folder}"])
    return cfg, train(cfg, show_progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("loop")
    plain = tiny_run(base / "plain")
    watched = tiny_run(base / "watched", "eval.every=1", "eval.every_max_images=2", "train.keep_best=true")
    full = tiny_run(base / "full", "eval.every=2")  # periodic images = the final evaluation's
    return {"plain": (base / "plain", *plain), "watched": (base / "watched", *watched),
            "full": (base / "full", *full)}


def test_periodic_evaluation_leaves_the_training_bitwise_unchanged(runs):
    _, cfg_a, plain = runs["plain"]
    out_b, cfg_b, watched = runs["watched"]
    assert cfg_a.identity_hash() == cfg_b.identity_hash() == plain.config_hash == watched.config_hash
    # the final metrics (student and Ens-T) are bitwise those of the run without eval.every
    assert watched.metrics == plain.metrics and watched.per_class_iou == plain.per_class_iou
    assert watched.extra_metrics == plain.extra_metrics and set(watched.extra_metrics) == {"ens_t"}
    a = load_checkpoint(runs["plain"][0] / "checkpoints" / "last.pt")
    b = load_checkpoint(out_b / "checkpoints" / "last.pt")
    for part in ("model", "method"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:  # weights and BatchNorm statistics: no RNG consumed, train mode restored
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a["rng_cpu"], b["rng_cpu"])
    assert plain.history == [] and plain.best is None


def test_history_and_best_beside_the_final_metric(runs):
    out, _, rec = runs["watched"]
    assert [e.iteration for e in rec.history] == [1, 2, 3, 4]
    assert all(e.images == 2 for e in rec.history)  # eval.every_max_images
    assert all(set(e.extra) == {"ens_t"} for e in rec.history)
    assert set(rec.history[0].per_class_iou) == set(rec.class_names)
    top = max(rec.history, key=lambda e: (e.miou, -e.iteration))
    assert (rec.best.miou, rec.best.iteration, rec.best.images) == (top.miou, top.iteration, 2)
    assert read_record(out) == rec  # the record on disk is typed and complete
    # the table metric stays the final evaluation's on all 3 images, whatever `best` says
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["metrics"]["miou"] == runs["plain"][2].metrics.miou and on_disk["schema"] == 7
    # with the same images, the last history entry is the final evaluation itself (not run twice)
    _, _, full = runs["full"]
    assert [e.iteration for e in full.history] == [2, 4]
    assert full.history[-1].miou == full.metrics.miou and full.history[-1].images == 3
    assert full.history[-1].extra["ens_t"] == full.extra_metrics["ens_t"]


def test_keep_best_keeps_the_weights_of_the_records_best(runs, tmp_path):
    """`train.keep_best` (on in the watched run, whose training and key the first test shows unchanged):
    best.pt is the state written right after the record's best evaluation, the last of the history it holds."""
    out, _, rec = runs["watched"]
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["iteration"] == rec.best.iteration and best["history"][-1]["miou"] == rec.best.miou
    assert len(best["history"]) == rec.best.iteration  # evaluated every iteration: saved at no later one
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    same = all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    assert same == (rec.best.iteration == rec.iterations)
    assert not (runs["full"][0] / "checkpoints" / "best.pt").exists()  # off by default
    # scored again from best.pt on the 2 images of the periodic evaluations: the history's best mIoU, and
    # recorded beside the last checkpoint's evaluations, not over them (`report --checkpoint best --eval-set`)
    scores = evaluate_checkpoint(out / "checkpoints" / "best.pt", "cpu", ["eval.max_images=2"], record=True)
    assert scores.iteration == rec.best.iteration and scores.images == 2
    assert scores.metrics["student"]["miou"] == pytest.approx(rec.best.miou, rel=1e-5)
    assert scores.recorded.parent == out / "evaluations" / "best"
    fake = tmp_path / "run"  # a last.pt named best.pt: refused before it is scored
    (fake / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "results.json", fake / "results.json")
    shutil.copy(out / "checkpoints" / "last.pt", fake / "checkpoints" / "best.pt")
    with pytest.raises(SdesbenchError, match="not the best periodic evaluation"):
        evaluate_checkpoint(fake / "checkpoints" / "best.pt", "cpu", record=True)
    with pytest.raises(ConfigError, match="train.keep_best .* set eval.every too"):
        build_config(SDES, TINY + ["train.keep_best=true"])


def test_tensorboard_scalars_equal_the_log(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = runs["watched"]
    expected: dict[tuple[str, int], float] = {}
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for line in lines:
        step = line["iter"]
        if "val" in line:
            val = line["val"]
            expected[("val/miou", step)] = val["miou"]
            expected[("val/pixel_acc", step)] = val["pixel_acc"]
            expected[("val/images", step)] = val["images"]
            expected[("val/ens_t/miou", step)] = val["ens_t"]["miou"]
            expected[("val/ens_t/pixel_acc", step)] = val["ens_t"]["pixel_acc"]
            for name, iou in val["per_class_iou"].items():
                if iou is not None:
                    expected[(f"val/per_class_iou/{name}", step)] = iou
        else:
            for key, value in line.items():
                if key != "iter" and value is not None:
                    expected[(f"train/{key}", step)] = value
    assert sum("val" in line for line in lines) == 4 and sum("loss" in line for line in lines) == 4
    rec = runs["watched"][2]  # and the final metrics at the last iteration, as the record has them
    expected.update({("final/miou", 4): rec.metrics.miou, ("final/pixel_acc", 4): rec.metrics.pixel_acc,
                     ("final/images", 4): 3, ("final/ens_t/miou", 4): rec.extra_metrics["ens_t"].miou,
                     ("final/ens_t/pixel_acc", 4): rec.extra_metrics["ens_t"].pixel_acc})
    expected.update({(f"final/per_class_iou/{k}", 4): v for k, v in rec.per_class_iou.items() if v is not None})
    assert {"train/loss", "train/lr", "train/ss", "train/dped", "train/dfed", "train/images_per_s"} <= \
        {tag for tag, _ in expected}
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    found = {(tag, ev.step): ev.value for tag in acc.Tags()["scalars"] for ev in acc.Scalars(tag)}
    assert found.keys() == expected.keys()
    for key, value in expected.items():  # TensorBoard stores float32
        assert found[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_a_resumed_run_keeps_its_history_log_and_events(runs, tmp_path, monkeypatch):
    """Stopped by a signal after iteration 2 (a checkpoint there), then resumed: the same history, log
    and TensorBoard scalars as the uninterrupted run, and the same final metrics."""
    import signal

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdesbench.engine.state import HookBase
    from sdesbench.engine.trainer import Trainer
    from sdesbench.errors import Interrupted

    class StopAfterTwo(HookBase):
        def after_step(self, trainer):
            if trainer.state.iteration == 2:
                trainer.state.stop_signal = signal.SIGTERM

    original = Trainer.build_hooks
    monkeypatch.setattr(Trainer, "build_hooks", lambda self: original(self) + [StopAfterTwo()])
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        tiny_run(out, "eval.every=1", "eval.every_max_images=2")
    assert [e.iteration for e in read_record(out).history] == [1, 2]  # an interrupted record keeps it too
    monkeypatch.setattr(Trainer, "build_hooks", original)
    cfg = build_config(SDES, TINY + ["eval.every=1", "eval.every_max_images=2", f"output.dir={out}"])
    rec = train(cfg, resume="required", show_progress=False)
    ref_out, _, ref = runs["watched"]
    assert rec.history == ref.history and rec.best == ref.best and rec.metrics == ref.metrics

    def without_timing(folder):
        lines = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k not in ("images_per_s", "iter_s", "data_s", "peak_memory_mb")}
                for line in lines]

    assert without_timing(out) == without_timing(ref_out)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()  # two event files, the second purging what the first wrote after iteration 2
    steps = [ev.step for ev in acc.Scalars("val/miou")]
    assert steps == [1, 2, 3, 4]
    assert [ev.value for ev in acc.Scalars("val/miou")] == pytest.approx([e.miou for e in ref.history], rel=1e-6)


def test_per_image_counts_reproduce_the_final_metrics(runs):
    out, _, rec = runs["watched"]
    assert rec.image_counts == "image_counts.npz"
    counts = read_image_counts(out, rec)
    assert counts.image_ids == ["tiny/val/0000", "tiny/val/0001", "tiny/val/0002"]
    for name, scores in (("student", rec.metrics), ("ens_t", rec.extra_metrics["ens_t"])):
        total = counts.counts[name].sum(0)
        assert miou_of_counts(total) == pytest.approx(scores.miou, abs=1e-12)
        assert pixel_acc_of_counts(total) == pytest.approx(scores.pixel_acc, abs=1e-12)
    assert (out / "image_counts.npz").stat().st_size < 4096  # small enough to keep in git


def test_image_counts_sum_to_the_confusion_matrix():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (3, 9, 7), generator=g)
    target = torch.randint(0, 5, (3, 9, 7), generator=g)
    target[0, :2] = 255
    counts = image_counts(pred, target, 5)
    mat = ConfusionMatrix(5)
    mat.update(pred, target)
    m = mat.mat
    assert torch.equal(counts[:, 0].sum(0), m.diag())
    assert torch.equal(counts[:, 1].sum(0), m.sum(0) - m.diag())  # predicted as c, labelled otherwise
    assert torch.equal(counts[:, 2].sum(0), m.sum(1) - m.diag())  # labelled c, predicted otherwise
    # image 1 alone, counted by hand
    p1, t1 = pred[1], target[1]
    for c in range(5):
        assert counts[1, 0, c] == int(((p1 == c) & (t1 == c)).sum())
        assert counts[1, 1, c] == int(((p1 == c) & (t1 != c)).sum())
        assert counts[1, 2, c] == int(((p1 != c) & (t1 == c)).sum())
    assert miou_of_counts(counts.sum(0).numpy()) == pytest.approx(mat.compute()["miou"], abs=1e-12)


def test_logging_and_watching_fields_stay_outside_the_run_key():
    plain = build_config({"method": {"name": "sdes", "expert": "light"}}, ["eval.max_images=3"])
    watched = build_config({"method": {"name": "sdes", "expert": "light"}},
                           ["eval.max_images=3", "eval.every=5", "eval.every_max_images=2", "output.tensorboard=false"])
    assert watched.identity_hash() == plain.identity_hash()


def test_bad_eval_every_is_one_line(tmp_path):
    assert_one_line_error(run_cli("train", "--iters", "2", "--set", "eval.every=0", "--out", str(tmp_path)),
                          "eval.every=0 is out of range")


def test_show_draws_two_runs(runs, tmp_path):
    from PIL import Image

    png = tmp_path / "grid.png"
    r = run_cli("show", str(runs["plain"][0]), str(runs["full"][0]), "--images", "2", "--out", str(png))
    assert r.returncode == 0, r.stderr
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > im.height  # 2 rows; image, truth, 2 x (student, Ens-T)
    assert_one_line_error(run_cli("show", str(tmp_path), "--out", str(png)), "has no checkpoint")


def test_colours_are_the_palette_and_ignored_pixels_black():
    from sdesbench.data.tiny import PALETTE
    from sdesbench.data.voc import PALETTE as VOC
    from sdesbench.report.qualitative import colourise

    labels = torch.tensor([[0, 3, 255], [10, 1, 255]])
    rgb = colourise(labels, PALETTE)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb[0, 0].tolist() == [128, 128, 128] and rgb[0, 1].tolist() == [128, 64, 128]  # Sky, Road
    assert rgb[1, 0].tolist() == [0, 128, 192] and rgb[1, 1].tolist() == [128, 0, 0]  # Bicyclist, Building
    assert rgb[0, 2].tolist() == [0, 0, 0] == rgb[1, 2].tolist()
    # VOC draws its background black: ignored pixels take VOC's own boundary colour there
    voc = colourise(torch.tensor([[0, 255]]), VOC)
    assert voc[0, 0].tolist() == [0, 0, 0] and voc[0, 1].tolist() == [224, 224, 192]


def test_gitignore_keeps_the_small_part_of_each_run():
    import subprocess

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT).returncode == 0

    run = "results/runs/tiny/deeplabv3_resnet18/sdes/0123456789ab"
    for kept in ("results.json", "log.jsonl", "image_counts.npz", "config.yaml"):
        assert not ignored(f"{run}/{kept}"), kept
    for dropped in ("checkpoints/last.pt", "checkpoints/iter_20.pt", "tensorboard/events.out.tfevents.1.x",
                    "cache/stats-tiny-train-0.pt", ".lock"):
        assert ignored(f"{run}/{dropped}"), dropped
    assert ignored("results/cache/costs.json")


def test_paper_presets_validate_ten_times_per_run_and_smoke_never():
    from sdesbench.experiments.plan import Sweep
    from sdesbench.experiments.spec import list_tables, load_spec

    for table in list_tables():
        spec = load_spec(table)
        paper = spec.preset_settings("paper")
        assert paper["eval"]["every"] * 10 == paper["train"]["iters"], table
        assert "every" not in spec.preset_settings("smoke").get("eval", {}), table
        plan = next(p for p in Sweep(table, "paper", (0,)).plans(spec) if p.cfg is not None)
        assert plan.cfg.eval.every == paper["eval"]["every"]


def test_committed_tables_regenerate_from_the_committed_records(tmp_path):
    """What a fresh clone holds (the records git tracks, no checkpoints) rebuilds the committed tables
    byte for byte."""
    import subprocess

    from sdesbench.experiments.plan import Sweep
    from sdesbench.report import build_report

    tracked = subprocess.run(["git", "ls-files", "results/runs"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0 or not tracked.stdout.strip():
        pytest.skip("not a git checkout with committed run records")
    files = tracked.stdout.split()
    assert {f.rsplit("/", 1)[-1] for f in files} == {"results.json", "log.jsonl", "image_counts.npz", "config.yaml"}
    def committed(path: str) -> bytes:  # as git holds it (the index): `make smoke` may rewrite the working copy
        return subprocess.run(["git", "show", f":{path}"], cwd=ROOT, capture_output=True, check=True).stdout

    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(committed(f))
    results = tmp_path / "results"
    for table in ("table4", "fig3"):
        written = build_report(Sweep(table, "smoke", (0,), results))
        assert written.kept is None
        for suffix in (".md", ".csv"):
            name = f"{table}-smoke{suffix}"
            assert (results / name).read_bytes() == committed(f"results/{name}"), name
