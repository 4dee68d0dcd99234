"""Plugins (issue 26.1): a method from a file outside the package is loaded by `--plugin`, `SDESBENCH_PLUGINS`,
a run configuration's `plugins:` or an entry point; it reaches every process that trains (`--workers`, a Slurm
job through submitit's local executor, `train --config` of the run's own config.yaml); its sha256 is part of
the key of the runs that use it, so one edited line makes its rows, and only its rows, stale; and every bad
plugin is one line with a non-zero exit, nothing recorded touched."""
from __future__ import annotations

import hashlib
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

from conftest import ROOT, read_json, run_cli
from sdesbench import plugins
from sdesbench.cli import main

MY_KD = ROOT / "tests" / "fixtures" / "plugins" / "my_kd.py"
MY_HOOK = ROOT / "tests" / "fixtures" / "plugins" / "my_hook.py"  # a training hook (issue 29.1)
HOOKS_SET = "train.hooks=[{name: final_note, file: note.json}]"
SPEC = """title: "my table"
teacher_seed: same
presets:
  smoke:
    data: {name: tiny, crop: [32, 32], batch_size: 2}
    train: {iters: 2, checkpoint_every: 100}
    eval: {max_images: 2}
groups:
  - name: ENet
    model: enet
    rows:
      - {label: Student, method: student}
      - {label: MyKD, method: my_kd, teacher: true}
      - {label: KL, method: kl, teacher: true}
"""


class Result:
    def __init__(self, code, out, err):
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture
def cli(monkeypatch, capsys):
    """`sdesbench ARGS` through the real entry point (`cli.main`: its error handling included), in this process
    (no interpreter start per case); every plugin it loaded is forgotten afterwards, so the registries the rest
    of the suite sees are the package's own."""
    before, handler = {p.target for p in plugins.loaded_plugins()}, signal.getsignal(signal.SIGINT)

    def call(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["sdesbench", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        captured = capsys.readouterr()
        return Result(e.value.code, captured.out, captured.err)

    yield call
    signal.signal(signal.SIGINT, handler)
    for p in plugins.loaded_plugins():
        if p.target not in before:
            plugins.unload(p)


def one_line_error(res: Result, *needles: str) -> None:
    assert res.returncode not in (0, None), res.stdout + res.stderr
    err = res.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- bad plugins

BAD = {
    "syntax.py": ("x = (\n", "syntax error at {path}:1"),
    "raises.py": ("import math\n\n\ndef f():\n    raise ValueError('no weights here')\n\n\nf()\n",
                  "ValueError: no weights here (at {path}:5)"),
    "empty.py": ("import math\n", "plugin {path} registers nothing"),
    "clash.py": ("from sdesbench.methods import METHODS\nfrom sdesbench.methods.kl import KL\n\n\n"
                 "@METHODS.register('kl')\nclass Mine(KL):\n    pass\n",
                 "method 'kl' of plugin {path} clashes with the built-in method 'kl'"),
    "not_dataclass.py": ("from sdesbench.methods import METHODS\nfrom sdesbench.methods.kl import KL\n\n\n"
                         "@METHODS.register('mine')\nclass Mine(KL):\n    class Options:\n        tau: float = 1.0\n",
                         "method 'mine': its Options must be a dataclass"),
    "collide.py": ("from dataclasses import dataclass\nfrom sdesbench.methods import METHODS\n"
                   "from sdesbench.methods.kl import KL, KLOptions\n\n\n@dataclass\nclass Other:\n"
                   "    kd_temperature: float = 2.0\n\n\n@METHODS.register('mine')\nclass Mine(KL):\n"
                   "    @dataclass\n    class Options(KLOptions, Other):\n        pass\n",
                   "option 'kd_temperature' is declared by both KLOptions and Other"),
    "reserved.py": ("from dataclasses import dataclass\nfrom sdesbench.methods import METHODS\n"
                    "from sdesbench.methods.kl import KL\n\n\n@METHODS.register('mine')\nclass Mine(KL):\n"
                    "    @dataclass\n    class Options(KL.Options):\n        name: str = 'x'\n",
                    "option 'name' collides with the method section's own key method.name"),
    "not_a_hook.py": ("from sdesbench.engine.hooks import HOOKS\n\n\n@HOOKS.register('mine')\nclass Mine:\n    pass\n",
                      "hook 'mine': register a subclass of sdesbench.engine.state.HookBase"),
}


@pytest.mark.parametrize("name", [*BAD, "missing.py"])
def test_a_bad_plugin_is_one_line_and_touches_nothing_recorded(cli, tmp_path, name):
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    (results / "table3-smoke.md").write_text("kept\n")
    path = tmp_path / name
    if name in BAD:
        path.write_text(BAD[name][0])
        needle = BAD[name][1].format(path=path)
    else:
        needle = f"plugin {path}: file not found"
    res = cli("--plugin", path, "run", "table3", "--results", results, "--no-progress")
    one_line_error(res, needle)
    assert sorted(p.relative_to(results).as_posix() for p in results.rglob("*")) == ["runs", "table3-smoke.md"]
    assert (results / "table3-smoke.md").read_text() == "kept\n"
    assert not plugins.loaded_plugins() or all(p.target != str(path) for p in plugins.loaded_plugins())
    ok = cli("list", "methods")  # what a failed plugin had registered is gone
    assert ok.returncode == 0 and "mine" not in ok.stdout.split() and "plugin" not in ok.stdout, ok.stdout


def test_two_plugins_registering_one_name_are_refused_naming_both(cli, tmp_path):
    a, b = tmp_path / "a" / "mine.py", tmp_path / "b" / "mine.py"
    for p in (a, b):
        p.parent.mkdir()
        shutil.copy(MY_KD, p)
    one_line_error(cli("--plugin", a, "--plugin", b, "list", "methods"),
                   f"method 'my_kd' of plugin {b} clashes with plugin {a} method 'my_kd'")


# --------------------------------------------------------------------------- loading and listing


def test_list_methods_names_the_plugin_and_its_file(tmp_path):
    """The acceptance command, as a user types it (a real process), with the plugin beside them."""
    shutil.copy(MY_KD, tmp_path / "my_kd.py")
    res = run_cli("--plugin", "my_kd.py", "list", "methods", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = {line.split()[0]: line.split(None, 1)[1] for line in res.stdout.splitlines()}
    assert lines["my_kd"] == f"plugin {tmp_path / 'my_kd.py'}"
    assert lines["kl"] == "built-in"


def test_loading_twice_is_once_and_modules_and_entry_points_load_too(cli, tmp_path, monkeypatch):
    shutil.copy(MY_KD, tmp_path / "my_kd.py")
    res = cli("--plugin", tmp_path / "my_kd.py", "--plugin", tmp_path / "." / "my_kd.py", "list", "methods")
    assert res.returncode == 0, res.stderr
    assert [p.label for p in plugins.loaded_plugins()] == ["my_kd.py"]
    assert plugins.loaded_plugins()[0].sha256 == sha256(MY_KD)
    # a module by name (`SDESBENCH_PLUGINS`, ':'-separated), and an installed package's entry point
    pkg = tmp_path / "site" / "kdpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(MY_KD.read_text().replace('"my_kd"', '"pkg_kd"'))
    (pkg / "extra.py").write_text("X = 1\n")
    dist = tmp_path / "site" / "kdpkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kdpkg\nVersion: 0.1\n")
    ep_mod = tmp_path / "site" / "epkd.py"
    ep_mod.write_text(MY_KD.read_text().replace('"my_kd"', '"ep_kd"'))
    (dist / "entry_points.txt").write_text("[sdesbench.plugins]\nmine = epkd\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SDESBENCH_PLUGINS", f"kdpkg:{tmp_path / 'my_kd.py'}")
    res = cli("list", "methods")
    assert res.returncode == 0, res.stderr
    origins = {line.split()[0]: line.split(None, 1)[1] for line in res.stdout.splitlines()}
    assert origins["pkg_kd"] == "plugin kdpkg" and origins["ep_kd"] == "plugin epkd", res.stdout
    by_label = {p.label: p for p in plugins.loaded_plugins()}
    files = sorted(pkg.rglob("*.py"), key=lambda p: str(p.relative_to(pkg)))
    package_sha = hashlib.sha256(b"".join(str(p.relative_to(pkg)).encode() + b"\0" + p.read_bytes() + b"\0"
                                          for p in files)).hexdigest()
    assert by_label["kdpkg"].sha256 == package_sha
    assert by_label["epkd"].sha256 == sha256(ep_mod)


def test_list_hooks_gives_each_priority_and_origin_and_a_bad_train_hooks_is_one_line(cli, tmp_path):
    res = cli("--plugin", MY_HOOK, "list", "hooks")
    assert res.returncode == 0, res.stderr
    rows = [line.split("  ") for line in res.stdout.splitlines()]
    rows = {r[0]: [c.strip() for c in r[1:] if c.strip()] for r in rows}
    # by priority: the order they run in; the built-in ones in every run, the plugin's where train.hooks names it
    assert list(rows) == ["signal", "log", "loggers", "progress", "periodic_evaluation", "checkpoint",
                          "final_note"], res.stdout
    assert rows["signal"] == ["priority 0 (HIGHEST)", "every run", "built-in"]
    assert rows["final_note"] == ["priority 70 (LOW)", "train.hooks", f"plugin {MY_HOOK}"]
    out = tmp_path / "run"
    for value, needle in [("[final_nte]", "unknown hook 'final_nte' (did you mean 'final_note'?)"),
                          ("[{name: final_note, fil: a.json}]",
                           "unknown config key 'train.hooks.final_note.fil' (did you mean 'train.hooks.final_note.file'?)"),
                          ("[{name: final_note, file: 3}]", "train.hooks.final_note.file: expected a string, got 3"),
                          ("[log]", "train.hooks: 'log' is built in and runs in every run"),
                          ("[final_note, final_note]", "train.hooks names 'final_note' twice")]:
        one_line_error(cli("--plugin", MY_HOOK, "train", "--iters", "1", "--out", out, "--set", f"train.hooks={value}"),
                       needle)
    assert not out.exists()  # refused before anything was written


def test_list_tables_gives_each_title_and_number_of_rows(cli, tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text(SPEC)
    monkeypatch.setenv("SDESBENCH_EXPERIMENTS", str(tmp_path))
    shutil.copy(MY_KD, tmp_path / "my_kd.py")
    res = cli("--plugin", tmp_path / "my_kd.py", "list", "tables")
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()}
    assert rows["mine"][1:5] == [str(tmp_path / "mine.yaml"), "3", "rows", "my"]
    assert rows["table3"][1:4] == ["built-in", "12", "rows"] and "Table 3: CamVid" in " ".join(rows["table3"])


# --------------------------------------------------------------------------- training with a plugin


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`sdesbench --plugin my_kd.py --plugin my_hook.py run mine.yaml --workers 2 --set train.hooks=[final_note]`:
    the plugins reach the two worker processes. Three runs on the tiny data (Student, which is also the teacher;
    MyKD; KL), 2 iterations each, each with the plugin's hook."""
    folder = tmp_path_factory.mktemp("plugin_table")
    shutil.copy(MY_KD, folder / "my_kd.py")
    shutil.copy(MY_HOOK, folder / "my_hook.py")
    (folder / "mine.yaml").write_text(SPEC)
    results = folder / "results"
    res = run_cli("--plugin", "my_kd.py", "--plugin", "my_hook.py", "run", "mine.yaml", "--results", results,
                  "--workers", "2", "--no-progress", "--set", HOOKS_SET, cwd=folder)
    return folder, results, res


def run_folder(results: Path, method: str) -> Path:
    (folder,) = (results / "runs" / "tiny" / "enet" / method).iterdir()
    return folder


def test_a_plugin_table_trains_in_two_workers_and_each_record_names_its_plugins(trained):
    folder, results, res = trained
    assert res.returncode == 0, res.stderr
    table = (results / "mine-smoke.md").read_text()
    (row,) = [line for line in table.splitlines() if "MyKD" in line]
    assert re.search(r"\b\d+\.\d\d\b", row), table  # a measured mIoU
    mine = read_json(run_folder(results, "my_kd") / "results.json")
    assert mine["status"] == "completed" and mine["metrics"]["miou"] > 0
    # the hook's plugin is loaded wherever a run trains (its config's plugins) but is never part of a key
    assert mine["config"]["plugins"] == [str(folder / "my_kd.py"), str(folder / "my_hook.py")]
    assert mine["config"]["plugin_sha256"] == {"my_kd.py": sha256(MY_KD)}
    for method in ("student", "kl"):  # built-in rows beside the plugin method: its plugin not in their record or key
        record = read_json(run_folder(results, method) / "results.json")
        assert record["status"] == "completed"
        assert record["config"]["plugins"] == [str(folder / "my_hook.py")] and record["config"]["plugin_sha256"] == {}
    # the plugin's hook ran in every run, in the worker processes, after the final evaluation: it saw each step
    for method in ("student", "my_kd", "kl"):
        run = run_folder(results, method)
        record = read_json(run / "results.json")
        assert record["config"]["train"]["hooks"] == [{"name": "final_note", "file": "note.json"}]
        assert read_json(run / "note.json") == {"steps": 2, "iteration": 2, "images": 2,
                                                "miou": record["metrics"]["miou"]}


def test_one_edited_line_makes_its_rows_and_only_its_rows_stale(trained, cli, tmp_path):
    folder, results, res = trained
    assert res.returncode == 0, res.stderr
    copy = results  # in place (a copy would move the teacher's checkpoint, whose path the runs' keys hold)
    edited = tmp_path / "my_kd.py"
    edited.write_text(MY_KD.read_text().replace("t * t * kl.mean()", "t ** 2 * kl.mean()"))
    before, after = sha256(MY_KD)[:12], sha256(edited)[:12]
    # the built-in rows keep their keys with no plugin loaded at all
    table_without = tmp_path / "builtin.yaml"
    table_without.write_text(SPEC.replace("      - {label: MyKD, method: my_kd, teacher: true}\n", ""))
    plan = cli("run", table_without, "--results", copy, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.count(" done ") + plan.stdout.count(" done│") + plan.stdout.count("│ done") >= 2, plan.stdout
    plan = cli("--plugin", edited, "run", folder / "mine.yaml", "--results", copy, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    status = {line.split("│")[1].strip(): line.split("│")[-2].strip() for line in plan.stdout.splitlines()
              if line.count("│") > 10 and "ENet/" in line}
    assert status == {"ENet/Student": "done", "ENet/KL": "done",
                      "ENet/MyKD": f"stale (plugin my_kd.py: {before} -> {after}): to run"}, plan.stdout
    report = cli("--plugin", edited, "report", folder / "mine.yaml", "--results", copy, "--force")
    assert report.returncode == 0, report.stderr
    assert f"stale (plugin my_kd.py: {before} -> {after})" in (copy / "mine-smoke.md").read_text()


def test_a_plugin_run_trains_as_a_submitit_job_and_from_its_own_config_yaml(trained, cli, tmp_path):
    """submitit's local executor runs the job in a process of its own (as a Slurm job would); `train --config`
    of the run's config.yaml, in an empty folder and without --plugin, is how each torchrun rank starts."""
    from sdesbench.engine.configure import build_config
    from sdesbench.experiments.launch import job_graph, slurm_executor, submit
    from sdesbench.experiments.plan import Dependency, PlannedRun

    folder, results, res = trained
    assert res.returncode == 0, res.stderr
    mine = run_folder(results, "my_kd")
    config = read_json(mine / "results.json")["config"]
    cfg = build_config({**config, "train": {**config["train"], "seed": 1}, "output": {"dir": str(tmp_path / "job")}})
    run = PlannedRun(key="ENet/MyKD", group="ENet", row="MyKD", seed=1, cfg=cfg,
                     dependencies=[Dependency("teacher", str(run_folder(results, "student")))])
    executor, extra = slurm_executor(tmp_path / "slurm", None, 0, 5, [], cluster="local")
    (handle,) = submit(job_graph([run]), executor, extra)
    assert handle.result()["miou"] > 0
    assert read_json(tmp_path / "job" / "note.json")["steps"] == 2  # the plugin's hook, from the run's config
    job = read_json(tmp_path / "job" / "results.json")
    assert job["status"] == "completed" and job["config"]["plugin_sha256"] == {"my_kd.py": sha256(MY_KD)}

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    again = run_cli("train", "--config", mine / "config.yaml", "--out", tmp_path / "again", "--no-progress", cwd=empty)
    assert again.returncode == 0, again.stderr
    assert read_json(tmp_path / "again" / "note.json")["steps"] == 2
    assert read_json(tmp_path / "again" / "results.json")["config_hash"] == read_json(mine / "results.json")["config_hash"]


def test_a_run_config_loads_its_plugins_relative_to_itself_and_only_a_plugin_run_keys_them(cli, tmp_path,
                                                                                            monkeypatch):
    from sdesbench.commands.train import _train_config

    (tmp_path / "cfg").mkdir()
    shutil.copy(MY_KD, tmp_path / "cfg" / "my_kd.py")
    yaml = tmp_path / "cfg" / "my.yaml"
    yaml.write_text("plugins: [my_kd.py]\nmodel: {name: enet}\nmethod: {name: my_kd, my_temperature: 2}\n"
                    "teacher: {model: enet, checkpoint: t.pt}\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg = _train_config(yaml, {}, [])
    assert cfg.plugins == [str(tmp_path / "cfg" / "my_kd.py")]
    assert cfg.plugin_sha256 == {"my_kd.py": sha256(MY_KD)} and cfg.method.options["my_temperature"] == 2.0
    # the same configuration with the built-in student: the plugin list does not change its key
    yaml.write_text("plugins: [my_kd.py]\nmodel: {name: enet}\n")
    student = _train_config(yaml, {}, [])
    yaml.write_text("model: {name: enet}\n")
    assert student.plugin_sha256 == {} and student.identity_hash() == _train_config(yaml, {}, []).identity_hash()
