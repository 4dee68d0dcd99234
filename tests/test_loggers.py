"""`output.loggers`: MLflow and W&B get the scalars of log.jsonl at the same iterations, the resolved configuration,
the run's key, table and row, and the final metrics, read back through their own readers (MLflow's client on the
file store, W&B's `wandb leet inspect` of the offline run's .wandb file); a resumed run sends no iteration twice;
a missing package or an unreachable tracking server is one line before training."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, assert_one_line_error, cli_env
from sdesbench.identity import flatten
from sdesbench.engine.loggers import STATE_FILE, event_scalars, mlflow_key

TINY = ["train.iters=4", "train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoints_every=2",
        "data.batch_size=2", "data.crop=32", "eval.max_images=3", "eval.every=2", "output.table=table3",
        "output.preset=smoke", "output.row=Student"]
LOGGERS = "output.loggers=[jsonl,mlflow,wandb]"


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    """The CLI's environment with W&B's and MLflow's own settings out of the way (offline, local store) and W&B's
    user folders under `tmp`, so that the test writes nothing outside it."""
    env = cli_env()
    for key in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[key] = str(tmp / "wandb-home")
    env.update(extra)
    return env


def train_cli(out: Path, tmp: Path, *flags: str, env: dict[str, str] | None = None,
              python: list[str] | None = None) -> subprocess.CompletedProcess:
    sets = [a for s in [*TINY, LOGGERS] for a in ("--set", s)]
    command = python or [sys.executable, "-m", "sdesbench"]
    return subprocess.run([*command, "train", *sets, "--out", str(out), "--no-progress", *flags], capture_output=True,
                          text=True, timeout=600, env=env or env_for(tmp), cwd=ROOT)


def log_scalars(out: Path, timing: bool = True) -> dict[tuple[str, int], float]:
    """(name, iteration) -> value of every scalar in log.jsonl, named as the loggers name them."""
    found = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        event = json.loads(line)
        for name, value in event_scalars(event).items():
            if timing or name.split("/")[-1] not in ("images_per_s", "iter_s", "data_s", "peak_memory_mb"):
                found[(name, event["iter"])] = value
    return found


def mlflow_run(out: Path):
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3's file store (engine/loggers.py)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    run_id = json.loads((out / STATE_FILE).read_text())["mlflow"]["run_id"]
    return client, client.get_run(run_id)


def mlflow_history(client, run) -> list[tuple[str, int, float]]:
    """Every (key, step, value) the run holds, repeats included."""
    return [(key, m.step, m.value) for key in run.data.metrics
            for m in client.get_metric_history(run.info.run_id, key)]


def wandb_records(out: Path) -> list[dict]:
    """The records of every offline W&B run in `out`, oldest first, as W&B's own reader prints them."""
    records = []
    for folder in sorted((out / "wandb").glob("offline-run-*")):
        proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)],
                              capture_output=True, text=True, timeout=120, env=env_for(out))
        assert proc.returncode == 0, proc.stderr
        records += [json.loads(line) for line in proc.stdout.splitlines()]
    return records


def wandb_history(records: list[dict]) -> list[tuple[str, int, float]]:
    return [(k, int(r["history"]["step"]["num"]), v) for r in records if r["type"] == "history"
            for k, v in r["history"]["item"].items() if not k.startswith("_")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loggers")
    proc = train_cli(tmp / "run", tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def test_mlflow_holds_the_logs_scalars_config_key_and_final_metrics(run):
    client, mlrun = mlflow_run(run)
    history = mlflow_history(client, mlrun)
    logged = {(k, step): v for k, step, v in history if not k.startswith("final/")}
    assert len(logged) == len([h for h in history if not h[0].startswith("final/")])  # no iteration twice
    expected = log_scalars(run)
    assert {"train/loss", "train/lr", "train/ss", "val/miou", "val/per_class_iou/Sky"} <= {k for k, _ in expected}
    assert sorted({s for _, s in expected}) == [1, 2, 3, 4]
    assert logged == expected  # MLflow keeps float64: exactly the logged numbers
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert mlrun.data.params == {mlflow_key(k): str(v) for k, v in flatten(config).items()}
    record = json.loads((run / "results.json").read_text())
    tags = mlrun.data.tags
    assert (tags["sdesbench.key"], tags["sdesbench.table"], tags["sdesbench.preset"], tags["sdesbench.row"]) == \
        (record["config_hash"], "table3", "smoke", "Student")
    assert client.get_experiment(mlrun.info.experiment_id).name == "sdesbench-table3"
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "Student seed 0"
    final = {k: v for k, step, v in history if k.startswith("final/") and step == 4}
    assert final["final/miou"] == record["metrics"]["miou"] and final["final/pixel_acc"] == record["metrics"]["pixel_acc"]
    assert {k.removeprefix("final/per_class_iou/"): v for k, v in final.items() if "per_class" in k} == \
        {k: v for k, v in record["per_class_iou"].items() if v is not None}


def test_wandb_offline_files_hold_the_same(run):
    records = wandb_records(run)
    history = wandb_history(records)
    logged = {(k, step): v for k, step, v in history}
    assert len(logged) == len(history) and logged == log_scalars(run)
    (start,) = [r["run"] for r in records if r["type"] == "run"]
    record = json.loads((run / "results.json").read_text())
    assert (start["project"], start["run_group"], start["display_name"]) == ("sdesbench-table3", "smoke", "Student seed 0")
    assert record["config_hash"] in start["tags"] and "table3" in start["tags"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    given = {k: v for k, v in start["config"]["update"].items() if k != "_wandb"}
    assert given == {**config, "run_key": record["config_hash"]}
    summary = {k: v for r in records if r["type"] == "summary" for k, v in r["summary"]["update"].items()}
    assert summary["final/miou"] == record["metrics"]["miou"]
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]


def test_a_resumed_run_sends_no_iteration_twice(run, tmp_path):
    """A run killed at iteration 4 after its checkpoint at 2 (its folder as it was then: last.pt = iter_2.pt, no
    record) resumes: log.jsonl is rewritten from iteration 3, and MLflow and W&B, which already have iterations 3
    and 4, are not sent them again; the same MLflow run and W&B run id continue."""
    out = tmp_path / "killed"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".lock"))
    shutil.copy(out / "checkpoints" / "iter_2.pt", out / "checkpoints" / "last.pt")
    for name in ("results.json", "image_counts.npz"):
        (out / name).unlink()
    sent = json.loads((out / STATE_FILE).read_text())
    proc = train_cli(out, tmp_path, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert {k: v["run_id"] for k, v in json.loads((out / STATE_FILE).read_text()).items()} == \
        {k: v["run_id"] for k, v in sent.items()}
    without_times = log_scalars(out, timing=False)
    assert without_times == log_scalars(run, timing=False)  # the resumed session trained the same numbers
    client, mlrun = mlflow_run(out)
    history = [h for h in mlflow_history(client, mlrun) if not h[0].startswith("final/")]
    assert len({(k, s) for k, s, _ in history}) == len(history)  # no (key, iteration) twice
    assert {(k, s): v for k, s, v in history if (k, s) in without_times} == without_times
    assert len(client.search_runs([mlrun.info.experiment_id])) == 1 and mlrun.info.status == "FINISHED"
    records = wandb_records(out)
    history = wandb_history(records)
    assert len({(k, s) for k, s, _ in history}) == len(history)  # both sessions' files: no (key, iteration) twice
    assert {(k, s): v for k, s, v in history if (k, s) in without_times} == without_times
    assert len({r["run"]["run_id"] for r in records if r["type"] == "run"}) == 1


def test_missing_package_is_one_line_before_training(tmp_path):
    """mlflow not importable (blocked in the interpreter, as if not installed): one line naming the extra, exit 2,
    and nothing trained (no checkpoint, no record)."""
    block = ("import sys; sys.modules['mlflow'] = None; sys.argv[0] = 'sdesbench'; "
             "from sdesbench.cli import main; sys.exit(main())")
    out = tmp_path / "blocked"
    proc = train_cli(out, tmp_path, python=[sys.executable, "-c", block])
    assert_one_line_error(proc, "mlflow", "pip install 'sdesbench[mlflow]'")
    assert proc.returncode == 2
    assert not (out / "checkpoints").exists() and not (out / "results.json").exists()


def test_a_tracking_server_that_does_not_answer_is_one_error(tmp_path, monkeypatch):
    """Checked as the hooks start, as the missing package above (the same path to the CLI's one line): a server
    that refuses the connection is one SdesbenchError at once, not MLflow's retries."""
    from sdesbench.engine.configure import build_config
    from sdesbench.engine.loggers import MlflowLogger
    from sdesbench.errors import SdesbenchError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    cfg = build_config({}, [LOGGERS, f"output.dir={tmp_path}"])
    with pytest.raises(SdesbenchError, match=r"tracking store http://127.0.0.1:9 does not answer .*MLFLOW_TRACKING_URI") as e:
        MlflowLogger().check(cfg)
    assert "\n" not in str(e.value)


def test_output_tensorboard_of_older_configs_reads_as_loggers():
    """Every config.yaml and record written before `output.loggers` has `output.tensorboard` (true, its default):
    it reads as the default loggers; false as the default without tensorboard; contradicting loggers is one line."""
    from sdesbench.config import parse_config
    from sdesbench.errors import ConfigError

    assert parse_config({"output": {"tensorboard": True}}).output.loggers == ["jsonl", "tensorboard"]
    assert parse_config({}, ["output.tensorboard=false"]).output.loggers == ["jsonl"]
    with pytest.raises(ConfigError, match="output.loggers replaces output.tensorboard"):
        parse_config({}, ["output.tensorboard=true", "output.loggers=[jsonl]"])
    with pytest.raises(ConfigError, match="did you mean 'mlflow'"):
        parse_config({}, ["output.loggers=[mlfow]"])


def test_a_planned_run_names_its_table_preset_and_row():
    from sdesbench.experiments.plan import Sweep

    plans = [p for p in Sweep("table3", "smoke").plans() if p.cfg is not None]
    assert {(p.cfg.output.table, p.cfg.output.preset) for p in plans} == {("table3", "smoke")}
    assert [p.cfg.output.row for p in plans] == [p.key for p in plans]
    assert "MobileNetV2/Student" in [p.key for p in plans]


def test_a_sweep_checks_its_loggers_once_before_its_first_run(tmp_path, monkeypatch):
    """`run` with a logger whose package is missing: one line before the first run (`pending_runs`), not the same
    failure once per run."""
    from sdesbench.errors import SdesbenchError
    from sdesbench.experiments.launch import pending_runs
    from sdesbench.experiments.plan import Sweep

    sweep = Sweep("table4", "smoke", (0,), tmp_path, overrides=("output.loggers=[jsonl,mlflow]",))
    plans = sweep.plans()
    assert all(p.cfg.output.loggers == ["jsonl", "mlflow"] for p in plans if p.cfg is not None)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(SdesbenchError, match=r"needs the mlflow package .*pip install 'sdesbench\[mlflow\]'") as e:
        pending_runs(plans, sweep)
    assert "\n" not in str(e.value)
    assert not any(p.out.exists() for p in plans if p.cfg is not None)  # nothing started
