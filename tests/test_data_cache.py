"""Damaged entries in $SDESBENCH_CACHE (class statistics `stats-*.pt`, dataset-check markers
`check-*.json`) are cache misses: recomputed, rewritten, said in one `note:` line; never a traceback."""
from __future__ import annotations

import json

import torch

from conftest import FAST, run_cli
from sdesbench.data.base import stats_cache_path
from sdesbench.data.camvid import CamVid
from test_datasets import make_camvid

# per-class pixels of the fixture's train split, by hand (test_datasets.camvid_label_a/b): Sky 384, Road 352, Car 744
TRAIN_COUNTS = [384, 0, 0, 352, 0, 0, 0, 0, 744, 0, 0]


def assert_note(stderr: str, path) -> None:
    notes = [line for line in stderr.splitlines() if line.startswith(f"note: cache entry {path} was unreadable (")]
    assert len(notes) == 1 and notes[0].endswith("; recomputing it"), stderr
    assert "Traceback" not in stderr, stderr


def test_stats_with_a_truncated_or_foreign_cache_file_recomputes_it(tmp_path, monkeypatch):
    root = make_camvid(tmp_path / "camvid")
    cache = tmp_path / "cache"
    monkeypatch.setenv("SDESBENCH_CACHE", str(cache))
    stats = stats_cache_path(CamVid(root, "train"), cache)
    first = run_cli("data", "stats", "camvid", "--root", str(root), "--json")
    assert first.returncode == 0, first.stderr
    good = stats.read_bytes()
    for damaged in (good[: len(good) // 2], b"", torch.tensor([1.5, 2.0]).numpy().tobytes()):
        stats.write_bytes(damaged)
        proc = run_cli("data", "stats", "camvid", "--root", str(root), "--json")
        assert proc.returncode == 0, proc.stderr
        assert_note(proc.stderr, stats)
        assert list(json.loads(proc.stdout).values()) == TRAIN_COUNTS
        assert torch.load(stats, weights_only=True).tolist() == TRAIN_COUNTS  # rewritten whole
    # a readable file of the wrong shape (another dataset's counts under this name) is a miss too
    torch.save(torch.zeros(19, dtype=torch.int64), stats)
    proc = run_cli("data", "stats", "camvid", "--root", str(root), "--json")
    assert proc.returncode == 0 and list(json.loads(proc.stdout).values()) == TRAIN_COUNTS, proc.stderr
    assert_note(proc.stderr, stats)
    assert not list(cache.glob("*.tmp")), list(cache.iterdir())


def test_training_with_a_corrupt_check_marker_and_stats_file_recomputes_both(tmp_path, monkeypatch):
    root = make_camvid(tmp_path / "camvid")
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SDESBENCH_CACHE", str(cache))
    train, val = CamVid(root, "train"), CamVid(root, "val")
    # train passed its check earlier (a valid marker), but its statistics file and val's marker are damaged
    (cache / f"check-camvid-train-{train.fingerprint()}.json").write_text('{"ok": true, "samples": 2}\n')
    val_marker = cache / f"check-camvid-val-{val.fingerprint()}.json"
    val_marker.write_text('{"ok": tr')
    stats = stats_cache_path(train, cache)
    stats.write_bytes(b"PK\x03\x04 half a zip archive")
    # SDES reads the training split's class statistics for its class split
    proc = run_cli("train", "--dataset", "camvid", "--data-root", str(root), "--method", "sdes", "--iters", "2",
                   "--device", "cpu", "--out", str(tmp_path / "run"), *FAST)
    assert proc.returncode == 0, proc.stderr
    assert_note(proc.stderr, val_marker)
    assert_note(proc.stderr, stats)
    assert json.loads(val_marker.read_text()) == {"ok": True, "samples": 1}
    assert torch.load(stats, weights_only=True).tolist() == TRAIN_COUNTS
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "completed"
