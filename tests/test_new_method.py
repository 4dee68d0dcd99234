"""`sdesbench new method NAME`: in an empty folder it writes a plugin method, its test and its smoke table;
the printed test command passes as written, the printed table command runs, the plugin trains, and bad
names are refused in one line with nothing written."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, read_json, run_cli
from sdesbench.errors import ConfigError
from sdesbench.experiments.scaffold import render, write_method


def printed_commands(stdout: str) -> tuple[str, str]:
    smoke = [line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith("run its table:")]
    test = [line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith("run its test:")]
    assert len(smoke) == len(test) == 1, stdout
    return smoke[0], test[0]


def run_printed(command: str, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """A printed command as a user would type it in `cwd`: `python` and `sdesbench` are this environment's."""
    argv = shlex.split(command)
    exe = {"python": [sys.executable], "sdesbench": [sys.executable, "-m", "sdesbench"]}[argv[0]]
    return subprocess.run([*exe, *argv[1:], *extra], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fresh")
    made = run_cli("new", "method", "foo", "--dir", str(folder / "mine"), cwd=folder)
    assert made.returncode == 0, made.stderr
    write_method("bar", teacher_student=True, folder=folder / "ts")  # the other template, tested beside it
    return folder, made.stdout


def test_new_method_writes_a_plugin_whose_printed_test_passes(written):
    folder, stdout = written
    assert sorted(p.name for p in (folder / "mine").iterdir()) == ["foo.py", "foo.yaml", "test_foo.py"]
    smoke, test = printed_commands(stdout)
    assert test == "python -m pytest mine/test_foo.py" and smoke == "sdesbench run mine/foo.yaml --preset smoke"
    # the printed command, and in the same process the teacher-student template's test (5 tests each: three
    # hand computations, the terms, the option ranges)
    passed = run_printed(test, folder, "-q", "-p", "no:cacheprovider", "ts/test_bar.py")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert re.search(r"^10 passed", passed.stdout, re.M), passed.stdout


def test_the_teacher_student_template_renders_its_own_kd(tmp_path):
    new = write_method("my_kd", teacher_student=True, folder=tmp_path)
    text = new.plugin.read_text()
    assert "class MyKd(TeacherStudentMethod)" in text and 'logged_terms = ("ss", "my_kd")' in text
    assert "mykd_temperature: float" in text and 'Pixels = Literal["labelled", "all"]' in text
    assert 'option_prefix = "mykd_"' in text  # the contract's form of a prefix (tests/test_method_api.py)
    assert "teacher: true" in new.spec.read_text() and "plugins: [my_kd.py]" in new.spec.read_text()
    compile(text, str(new.plugin), "exec")
    compile(new.test.read_text(), str(new.test), "exec")


@pytest.mark.parametrize("name,why", [("1x", "not a lower-case Python identifier"), ("my-kd", "not a lower-case"),
                                      ("MyKD", "not a lower-case"), ("class", "not a lower-case"),
                                      ("kl", "already a method"),
                                      ("torch", "installed module")])
def test_bad_names_are_refused_in_one_line(tmp_path, name, why):
    with pytest.raises(ConfigError) as e:
        write_method(name, folder=tmp_path)
    assert why in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_an_existing_file_is_refused_and_nothing_is_written(tmp_path):
    (tmp_path / "test_bar.py").write_text("# the author's own\n")
    with pytest.raises(ConfigError, match="test_bar.py exists"):
        write_method("bar", folder=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_bar.py"]
    assert set(render("bar", False)) == {"bar.py", "test_bar.py", "bar.yaml"}


def test_the_printed_table_command_plans_the_base_rows_and_the_plugins(written):
    """The printed smoke command itself (here with --dry-run: training its seven runs takes 25 s of CPU with
    2 iterations each): the spec extends Table 3 and loads the plugin."""
    folder, stdout = written
    smoke, _ = printed_commands(stdout)
    planned = run_printed(smoke, folder, "--dry-run", "--results", str(folder / "results"))
    assert planned.returncode == 0, planned.stderr
    assert "MobileNetV2/foo" in planned.stdout and "MobileNetV2/Tf-KD" in planned.stdout, planned.stdout
    assert "7 distinct runs" in planned.stdout, planned.stdout


def test_a_plugin_model_as_documented_trains_with_the_plugin_method(written):
    """The docs' own model (the code block of their section "Models from outside", as written there) and the
    written method, both as plugins."""
    folder, _ = written
    pages = [p.read_text() for p in sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))]
    (docs,) = [text for text in pages if "\n## Models from outside\n" in text]
    section = docs.split("\n## Models from outside\n", 1)[1].split("\n## ", 1)[0]
    (folder / "my_net.py").write_text(section.split("```python\n", 1)[1].split("```", 1)[0])
    trained = run_cli("--plugin", "my_net.py", "--plugin", "mine/foo.py", "train", "--model", "my_net",
                      "--method", "foo", "--dataset", "tiny", "--iters", "2", "--out", "run", "--set",
                      "data.batch_size=2", "--set", "data.crop=32", "--set", "eval.max_images=2", "--no-progress",
                      cwd=folder)
    assert trained.returncode == 0, trained.stderr
    record = read_json(folder / "run" / "results.json")
    assert (record["model"], record["method"], record["status"]) == ("my_net", "foo", "completed")
    logged = json.loads((folder / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert logged["loss"] == pytest.approx(logged["ss"] + logged["foo"], rel=1e-4) and logged["foo"] > 0
