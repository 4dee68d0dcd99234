"""Tables that extend ours (issue 26, section 2): a spec with `extends:` adds rows to a base table's groups or
adds groups, inherits its presets, protocol, options and reference numbers, and keeps only `only_groups` of the
base's groups. The base's rows keep their configuration hashes under the extension, so a results folder that
holds the base's runs trains only the extension's own rows."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from sdesbench import plugins
from sdesbench.errors import ConfigError
from sdesbench.experiments.plan import Sweep
from sdesbench.experiments.spec import load_spec
from sdesbench.report import ReportOptions, build_report
from conftest import rows_of
from test_significance import fake_run

STUDENTS = {"DeepLabV3-ResNet-18", "DeepLabV3-MobileNetV2", "PSPNet-ResNet-18"}
ROW = "{label: Mine, method: kl, teacher: deeplabv3_resnet101_cirkd, options: {kd_temperature: 4}}"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def mine(folder: Path, extra: str = "", groups=STUDENTS) -> Path:
    rows = "".join(f"  - {{name: {g}, rows: [{ROW}]}}\n" for g in sorted(groups))
    return write(folder, "mine.yaml", f"extends: cirkd\n{extra}groups:\n{rows}")


def planned(table: str, preset: str, results: Path) -> dict[tuple[str, int], object]:
    return {(p.key, p.seed): p for p in Sweep(table, preset, (0, 1), results).plans()}


@pytest.mark.parametrize("preset", ["smoke", "paper"])
def test_the_base_rows_keep_their_keys_under_an_extension(tmp_path, preset):
    results = tmp_path / "results"
    base = planned("cirkd", preset, results)
    ext = planned(str(mine(tmp_path)), preset, results)
    new = set(ext) - set(base)
    assert new == {(f"{g}/Mine", s) for g in STUDENTS for s in (0, 1)}
    for key, plan in base.items():  # every base run, its teacher included, is the same run in the same folder
        other = ext[key]
        assert (other.out, other.cfg.request, other.depends_on, other.paper) == \
               (plan.out, plan.cfg.request, plan.depends_on, plan.paper), key
    for g in STUDENTS:  # the new rows distil from the base's teacher run, under the group's inherited protocol
        row, kd = ext[(f"{g}/Mine", 0)], base[(f"{g}/KD", 0)]
        assert row.depends_on == kd.depends_on and row.cfg.method.options["kd_temperature"] == 4
        assert row.cfg.model == kd.cfg.model and row.cfg.data == kd.cfg.data and row.cfg.train == kd.cfg.train
        assert row.cfg.method.options == {**kd.cfg.method.options, "kd_temperature": 4}  # the spec's kl options too


def test_only_groups_keeps_a_subset_and_a_new_group_has_its_own_network(tmp_path):
    results = tmp_path / "results"
    path = mine(tmp_path, "only_groups: [DeepLabV3-ResNet-18]\n", {"DeepLabV3-ResNet-18"})
    text = path.read_text() + ("  - {name: ResNet-50, model: deeplabv3_resnet50, "
                               "rows: [{label: Baseline, method: student}, " + ROW + "]}\n")
    path.write_text(text)
    spec = load_spec(str(path))
    assert [g.name for g in spec.groups] == ["DeepLabV3-ResNet-18", "ResNet-50"]
    assert spec.extends == "cirkd" and spec.title.endswith("extended by mine")
    assert [r.label for r in spec.groups[0].rows][-2:] == ["FitNet", "Mine"]
    assert spec.groups[0].rows[0].miou == 74.21  # the base's reference numbers
    base = planned("cirkd", "smoke", results)
    ext = planned(str(path), "smoke", results)
    teacher = ("teacher:deeplabv3_resnet101_cirkd", 0)
    assert ext[teacher].out == base[teacher].out  # one teacher for the base's rows and the new group's
    kept = {k for k in base if k[0].startswith("DeepLabV3-ResNet-18/")}
    assert {k for k in ext if k in base} == kept | {teacher, (teacher[0], 1)}
    assert all(ext[k].out == base[k].out for k in kept)
    assert ext[("ResNet-50/Baseline", 0)].cfg.model.name == "deeplabv3_resnet50"


def test_an_extension_of_an_extension_and_a_base_given_by_its_path(tmp_path):
    sub = tmp_path / "specs"
    sub.mkdir()
    mine(sub, "only_groups: [DeepLabV3-ResNet-18]\n", {"DeepLabV3-ResNet-18"})
    more = write(tmp_path, "more.yaml", "extends: specs/mine.yaml\ngroups:\n"
                 "  - {name: DeepLabV3-ResNet-18, rows: [{label: Mine T2, method: kl, "
                 "teacher: deeplabv3_resnet101_cirkd, options: {kd_temperature: 2}}]}\n")
    spec = load_spec(str(more))
    assert spec.extends == "mine" and [r.label for r in spec.groups[0].rows][-2:] == ["Mine", "Mine T2"]


@pytest.mark.parametrize("text, needle", [
    ("extends: cirkd\nonly_groups: [DeepLabV3-ResNet18]\n", "has no group 'DeepLabV3-ResNet18' (did you mean "
                                                            "'DeepLabV3-ResNet-18'?)"),
    ("extends: cirkd\ngroups:\n  - {name: DeepLabV3-ResNet-18, config: {model: {aux: false}}, rows: []}\n",
     "its settings (config) are the base's"),
    ("extends: cirkd\ngroups:\n  - {name: DeepLabV3-ResNet-18, rows: [{label: KD, method: kl}]}\n",
     "already has a row 'KD'"),
    ("extends: cirkd\ngroups:\n  - {name: New, rows: [{label: A}]}\n", "missing 'model'"),
    ("extends: cirkdd\n", "unknown table 'cirkdd'"),
    ("extends: loop.yaml\n", "a cycle"),
    ("extends: bad\n", "a cycle"),  # by name, through $SDESBENCH_EXPERIMENTS: itself
    ("only_groups: [A]\npresets: {smoke: {}}\n", "needs 'extends: <table>'"),
    ("extends: fig3\n", "a sweep spec has no groups"),
])
def test_a_bad_extension_is_one_line(tmp_path, monkeypatch, text, needle):
    monkeypatch.setenv("SDESBENCH_EXPERIMENTS", str(tmp_path))
    write(tmp_path, "loop.yaml", "extends: bad.yaml\n")
    bad = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_spec(str(bad))
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)



# ----------------------------------------------------------------------------- the report

OURS = "L_SS + L_DPED + L_DFED"  # table4's SDES row, the row `--against` names
MIOU = {"L_SS": [60.0, 61.0, 62.5], OURS: [63.0, 63.5, 65.0], "Mine": [64.0, 66.0, 66.5]}


def welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float, float, float]:
    """mean(a) - mean(b), its Welch 95% interval and p, from the formula (scipy's ttest_ind for p)."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    delta, half = np.mean(a) - np.mean(b), scipy.stats.t.ppf(0.975, df) * np.sqrt(va + vb)
    return delta, delta - half, delta + half, scipy.stats.ttest_ind(a, b, equal_var=False).pvalue


def test_the_report_puts_the_new_rows_beside_the_bases_and_compares_them_against_a_named_row(tmp_path):
    results = tmp_path / "results"
    spec = write(tmp_path, "mine.yaml", "extends: table4\ngroups:\n  - {name: EfficientNet-B0, rows: "
                                        "[{label: Mine, method: sdes, options: {tau: 3}}]}\n")
    seeds = (0, 1, 2)
    base = {(p.row, p.seed): p for p in Sweep("table4", "smoke", seeds, results).plans()}
    ext = {(p.row, p.seed): p for p in Sweep(str(spec), "smoke", seeds, results).plans()}
    for (row, seed), plan in ext.items():  # the base's runs recorded under the base's own table, the new row's here
        if row in MIOU:
            fake_run(base.get((row, seed), plan), MIOU[row][seed])
    with pytest.raises(ConfigError, match="has no row 'SDES'"):
        build_report(Sweep(str(spec), "smoke", seeds, results), ReportOptions(against="SDES"))
    md = build_report(Sweep(str(spec), "smoke", seeds, results), ReportOptions(against=OURS)).md
    rows = rows_of(md)
    assert list(rows)[-1] == "Mine" and len(rows) == 6  # table4's five rows, then the new one, same columns
    assert rows["L_SS"]["paper mIoU"] == "67.56" and rows["Mine"]["paper mIoU"] == "—"
    assert rows["L_SS"]["mIoU"] == "61.17 ± 1.26" and rows["Mine"]["mIoU"] == "65.50 ± 1.32"
    assert rows["Mine"]["Δ Student mIoU"] == f"{np.mean(MIOU['Mine']) - np.mean(MIOU['L_SS']):+.2f}" == "+4.33"
    assert rows["Mine"][f"Δ {OURS} mIoU"] == "+1.67" and rows[OURS][f"Δ {OURS} mIoU"] == "ref"
    for versus, p_column in (("Student", "Welch p mIoU"), (OURS, f"Welch p vs {OURS} mIoU")):
        delta, low, high, p = welch_by_hand(MIOU["Mine"], MIOU["L_SS" if versus == "Student" else OURS])
        star = " *" if low > 0 or high < 0 else ""
        assert rows["Mine"][f"vs {versus} mIoU (seeds: Welch 95% CI)"] == f"{delta:+.2f} [{low:+.2f}, {high:+.2f}]{star}"
        assert rows["Mine"][p_column] == f"{p:.3f}"
    assert rows["L_SS + L_DFED"][f"vs {OURS} mIoU (seeds: Welch 95% CI)"] == "—"  # never run
    assert rows["Mine"]["L_DPED"] == "" and rows["Rand split + L_DFED"]["L_DPED"] == "random split"
    assert "Extends the table `table4`" in md and f"`--against {OURS}`" in md


# ----------------------------------------------------------------------------- plugins: in a spec

MY_KD = Path(__file__).parent / "fixtures" / "plugins" / "my_kd.py"  # the plugin tests/test_plugins.py loads


@pytest.fixture
def forget_plugins():
    """Every plugin a test loads is forgotten afterwards: the rest of the suite sees the package's registries."""
    before = {p.target for p in plugins.loaded_plugins()}
    yield
    for p in plugins.loaded_plugins():
        if p.target not in before:
            plugins.unload(p)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_specs_plugins_load_with_it_reach_every_run_and_are_inherited(tmp_path, forget_plugins):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "specs").mkdir()
    plugin = tmp_path / "plugins" / "my_kd.py"
    shutil.copy(MY_KD, plugin)
    row = "{label: MyKD, method: my_kd, teacher: deeplabv3_resnet101_cirkd}"
    write(tmp_path / "specs", "mine.yaml", "extends: cirkd\nplugins: [../plugins/my_kd.py]\n"
          f"only_groups: [DeepLabV3-ResNet-18]\ngroups:\n  - {{name: DeepLabV3-ResNet-18, rows: [{row}]}}\n")
    more = write(tmp_path, "more.yaml", "extends: specs/mine.yaml\n")  # inherits the plugin, from another folder
    results = tmp_path / "results"
    base = planned("cirkd", "smoke", results)
    for spec in (tmp_path / "specs" / "mine.yaml", more):
        assert load_spec(str(spec)).plugins == [str(plugin.resolve())]  # absolute: a worker finds it anywhere
        ext = planned(str(spec), "smoke", results)
        assert all(p.cfg.plugins == [str(plugin.resolve())] for p in ext.values())
        assert all(ext[k].out == base[k].out for k in ext if k in base)  # built-in rows keep their keys
        mine = ext[("DeepLabV3-ResNet-18/MyKD", 0)].cfg
        assert mine.method.options["my_temperature"] == 4.0 and mine.plugin_sha256 == {"my_kd.py": sha256_of(plugin)}


def test_a_missing_plugin_of_a_spec_is_one_line_naming_the_spec(tmp_path, forget_plugins):
    bad = write(tmp_path, "bad.yaml", "extends: table4\nplugins: [nowhere.py]\n")
    with pytest.raises(ConfigError) as err:
        load_spec(str(bad))
    assert str(err.value).startswith("bad.yaml: plugin ") and "not found" in str(err.value), str(err.value)
