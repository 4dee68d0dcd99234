"""The architecture holds: layers import downwards only, no import cycles, no copied logic, one
training step, and typed run records that read what earlier versions wrote."""
import ast
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from sdesbench.engine.record import SCHEMA_VERSION, RunRecord, read_record, write_record

PACKAGE = ROOT / "sdesbench"
# data -> models -> methods -> engine -> experiments -> measure -> report -> cli: a module may import
# its own layer and those before it. The base modules (errors, io, validate, identity, config, registry, version,
# console) come first.
LAYERS = ["base", "data", "models", "methods", "engine", "experiments", "measure", "report", "cli"]
BASE = {"sdesbench", "sdesbench.errors", "sdesbench.io", "sdesbench.validate", "sdesbench.identity", "sdesbench.config",
        "sdesbench.registry", "sdesbench.plugins",
        "sdesbench.version", "sdesbench.console"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    if module in BASE:
        return 0
    top = module.split(".")[1]
    if top in ("cli", "commands", "__main__"):
        return LAYERS.index("cli")
    return LAYERS.index(top)


def imports_of(module: str) -> set[str]:
    """Every sdesbench module `module` imports, at module level or inside functions, plus the modules a
    package's `__init__` imports dynamically with `import_submodules`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sdesbench")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdesbench"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "import_submodules":
            found |= {m for m in MODULES if m.startswith(module + ".") and m.count(".") == module.count(".") + 1}
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_the_import_walk_sees_function_level_imports():
    # sanity check of the walker itself: commands import the layers below inside their functions
    assert "sdesbench.engine.trainer" in GRAPH["sdesbench.commands.train"]
    assert "sdesbench.models.deeplabv3" in GRAPH["sdesbench.models"]  # import_submodules


def test_no_module_imports_from_a_layer_above_it():
    upward = [(m, d) for m, deps in GRAPH.items() for d in deps if layer(d) > layer(m)]
    assert upward == []


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []


# ----------------------------------------------------------------------------- duplicated logic

WINDOW = 8
TOKEN = re.compile(r"""("[^"]*"|'[^']*'|\b\d+(\.\d+)?(e-?\d+)?\b|\b[A-Za-z_]\w*\b)""")
KEYWORDS = {"def", "class", "return", "if", "else", "elif", "for", "in", "while", "with", "as", "try", "except",
            "finally", "raise", "import", "from", "not", "and", "or", "is", "None", "True", "False", "lambda",
            "yield", "continue", "break", "pass", "self"}


def shape(line: str) -> str:
    """A line with names, strings and numbers replaced, so renamed copies look alike."""
    return TOKEN.sub(lambda m: m.group(0) if m.group(0) in KEYWORDS else "_", line.strip())


def is_literal(node: ast.AST) -> bool:
    """A constant, or a tuple/list of them (strings joined over lines included)."""
    if isinstance(node, (ast.Tuple, ast.List)):
        return all(is_literal(e) for e in node.elts)
    return isinstance(node, ast.Constant)


def logic_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, shape) of the lines that carry logic: no blanks, comments, docstrings, imports,
    decorators, dataclass-style field declarations (`name: type = default`) or a class's declarations of
    literal values (a method's `logged_terms = ("ss", "kd")`, `conformance = "kl.json"`)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            skip |= set(range(body[0].lineno, body[0].end_lineno + 1))
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.AnnAssign)):
            skip |= set(range(node.lineno, node.end_lineno + 1))
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and is_literal(stmt.value):
                    skip |= set(range(stmt.lineno, stmt.end_lineno + 1))
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if i in skip or not text or text.startswith(("#", "@")):
            continue
        out.append((i, shape(text)))
    return out


def test_no_logic_is_copied_eight_lines_or_more():
    seen: dict[tuple[str, ...], str] = {}
    copies = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = logic_lines(path)
        for k in range(len(lines) - WINDOW + 1):
            window = tuple(s for _, s in lines[k:k + WINDOW])
            where = f"{path.relative_to(ROOT)}:{lines[k][0]}"
            if window in seen and not seen[window].startswith(f"{path.relative_to(ROOT)}:"):
                copies.append((seen[window], where))
            seen.setdefault(window, where)
    assert copies == []


# ----------------------------------------------------------------------------- one training step


def test_the_step_exists_once(tmp_path, monkeypatch):
    """A change to `engine.step.train_step` reaches the Trainer, `bench`, the training-FLOPs count and
    the test matrix (which calls it directly): none of them has its own copy of the step."""
    from sdesbench.engine import step
    from sdesbench.engine.configure import build_config
    from sdesbench.engine.trainer import train
    from sdesbench.measure.bench import BenchSettings, run_bench
    from sdesbench.engine.cost import train_step_flops

    calls: list[str] = []
    original = step.train_step

    def counted(learner, *args, **kwargs):
        calls.append(type(learner.method).__name__)
        return original(learner, *args, **kwargs)

    monkeypatch.setattr(step, "train_step", counted)
    cfg = build_config({}, ["train.iters=2", "data.batch_size=2", "data.crop=32", "eval.max_images=2",
                            f"output.dir={tmp_path / 'run'}"])
    train(cfg, show_progress=False)
    assert len(calls) == 2
    calls.clear()
    run_bench(BenchSettings(methods=["student"], rounds=1, steps=1, warmup=1, crop=32, batch=2, eval_images=1,
                            loader_batches=1, device="cpu", tables=False))
    assert len(calls) >= 3  # a trial step, warm-up, a timed block, memory and FLOPs
    calls.clear()
    train_step_flops(cfg)
    assert calls == ["Student"]


# ----------------------------------------------------------------------------- typed records


def test_a_version_1_record_still_loads(tmp_path):
    v1 = json.loads((ROOT / "tests" / "fixtures" / "results_v1.json").read_text())
    assert "schema" not in v1  # written before records had a version
    (tmp_path / "results.json").write_text(json.dumps(v1))
    rec = read_record(tmp_path)
    assert rec.completed and rec.method == "sdes" and rec.iterations == 40
    assert rec.metrics.miou == v1["metrics"]["miou"] and rec.scores("ens_t").miou == v1["extra_metrics"]["ens_t"]["miou"]
    assert rec.per_class_iou == v1["per_class_iou"] and rec.config == v1["config"]
    # its wall_time_s summed the step times (schema < 4): read as the step time, its wall time unknown
    assert rec.step_time_s == v1["wall_time_s"] == 17.468 and rec.wall_time_s is None and rec.timings is None
    # written back, it is the same record with its schema number and the fields later versions added, empty
    assert rec.to_dict() == {"schema": SCHEMA_VERSION, **v1, **V3_FIELDS, **V7_FIELDS, **v4_fields(v1), **v5_fields(v1)}


V3_FIELDS = {"history": [], "best": None, "image_counts": None}  # added by schema 3
V7_FIELDS = {"cost": None}  # added by schema 7 (an older record's cost is derived by cost_of, never stored)


def v4_fields(old: dict) -> dict:
    """What schema 4 makes of an older record's times."""
    return {"wall_time_s": None, "step_time_s": old["wall_time_s"], "timings": None}


def v5_fields(old: dict) -> dict:
    """Schema 5 added mAcc to every score, schema 6 mDice and mFscore: None in an older record."""
    added = {"macc": None, "mdice": None, "mfscore": None}
    return {"metrics": {**old["metrics"], **added},
            "extra_metrics": {k: {**v, **added} for k, v in old["extra_metrics"].items()}}


def test_a_version_2_record_still_loads(tmp_path):
    v2 = {"schema": 2, **json.loads((ROOT / "tests" / "fixtures" / "results_v1.json").read_text())}
    (tmp_path / "results.json").write_text(json.dumps(v2))
    rec = read_record(tmp_path)
    assert rec.completed and rec.history == [] and rec.best is None and rec.image_counts is None
    assert rec.to_dict() == {**v2, "schema": SCHEMA_VERSION, **V3_FIELDS, **V7_FIELDS, **v4_fields(v2), **v5_fields(v2)}


def test_a_version_4_record_keeps_its_times(tmp_path):
    v1 = json.loads((ROOT / "tests" / "fixtures" / "results_v1.json").read_text())
    timings = {"setup_s": 1.5, "data_check_s": 0.25, "train_s": 12.0, "eval_s": 3.0, "checkpoint_s": 0.5}
    v4 = {**v1, "schema": 4, "wall_time_s": 19.0, "step_time_s": 10.0, "timings": timings}
    (tmp_path / "results.json").write_text(json.dumps(v4))
    rec = read_record(tmp_path)
    assert (rec.wall_time_s, rec.step_time_s, rec.timings.train_s) == (19.0, 10.0, 12.0)
    assert rec.to_dict() == {**v4, **V3_FIELDS, **V7_FIELDS, "schema": SCHEMA_VERSION, **v5_fields(v4)}


def test_records_round_trip_through_json(tmp_path):
    v1 = json.loads((ROOT / "tests" / "fixtures" / "results_v1.json").read_text())
    rec = RunRecord.from_dict(v1)
    write_record(tmp_path, rec)
    again = read_record(tmp_path)
    assert again == rec
    assert json.loads((tmp_path / "results.json").read_text())["schema"] == SCHEMA_VERSION


@pytest.mark.parametrize("text,needle", [
    ('{"status": "completed", "schema": 99}', "schema 99 is newer"),
    ('{"status": "finished"}', "status must be one of completed, failed, interrupted"),
    ('{"status": "completed", "metrics": {"miou": "high"}}', "metrics.miou: expected a number"),
    ('{"status": "compl', "unreadable"),
])
def test_a_bad_record_is_one_clear_error(tmp_path, text, needle):
    from sdesbench.errors import StorageError

    (tmp_path / "results.json").write_text(text)
    with pytest.raises(StorageError, match=re.escape(needle)):
        read_record(tmp_path)


def test_records_of_the_trainer_are_typed(tmp_path):
    from sdesbench.engine.configure import build_config
    from sdesbench.engine.trainer import train

    cfg = build_config({}, ["train.iters=1", "data.batch_size=2", "data.crop=32", "eval.max_images=1",
                            f"output.dir={tmp_path}"])
    rec = train(cfg, show_progress=False)
    assert isinstance(rec, RunRecord) and read_record(tmp_path) == rec
    assert rec.eval_split == "val" and 0 <= rec.metrics.miou <= 1
    assert torch.__version__ == rec.torch_version
