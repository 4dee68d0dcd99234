"""`sdesbench new method NAME`: a plugin method written from the method contract, for its author to change.

Three files in one folder, which pass and run as written:
- `NAME.py`: the plugin. An `Options` dataclass (names prefixed with NAME less its '_', a `Literal` choice,
  ranges), a pure loss function with its equation written in the docstring, `loss_terms`, and the class
  attributes the contract asks for (`logged_terms`, `option_prefix`, `conformance` None with its reason). With
  `teacher_student` it is pixel-wise KD from the teacher at a temperature (Hinton et al. 2015, Sec. 2);
  without, a teacher-free self-KD (Tf-KD_reg's virtual teacher, Yuan et al. 2020, Eq. 9-10) at a temperature.
- `test_NAME.py`: the loss computed by hand from the written-out formula (plain Python floats, pixel by
  pixel) on a seeded input, compared with the function; and the method's terms against its `logged_terms`.
- `NAME.yaml`: a table spec that extends a small built-in table (Table 3, one of its groups) with a row of
  the method, loading the plugin (`plugins: [NAME.py]`): the smoke table.

The CLI (`commands/new.py`) parses and prints; rendering, the name checks and the writing are here.
"""
from __future__ import annotations

import importlib.util
import keyword
import re
from dataclasses import dataclass
from pathlib import Path
from string import Template

from sdesbench.errors import ConfigError
from sdesbench.io import write_text
from sdesbench.methods import METHODS

# The built-in table the smoke spec extends, and its group: the teacher-student row sits beside the
# group's KL* row (teacher: another trained copy of the student), the self-KD row beside Tf-KD and LSR.
BASE_TABLE = "table3"
GROUP = {True: "EfficientNet-B0", False: "MobileNetV2"}


@dataclass(frozen=True)
class NewMethod:
    plugin: Path
    test: Path
    spec: Path

    def commands(self, cwd: Path | None = None) -> tuple[str, str]:
        """The smoke table's command and the test's, with the paths as seen from `cwd`."""
        return (f"sdesbench run {_shown(self.spec, cwd)} --preset smoke",
                f"python -m pytest {_shown(self.test, cwd)}")


def _shown(path: Path, cwd: Path | None) -> str:
    cwd = (cwd or Path.cwd()).resolve()
    try:
        return str(path.resolve().relative_to(cwd))
    except ValueError:
        return str(path.resolve())


def option_prefix(name: str) -> str:
    """The prefix of the method's option names: its name without '_' (`my_kd` -> `mykd_`), as the contract's
    prefixes are (`cwd_`, `kd_`)."""
    return name.replace("_", "") + "_"


def check_name(name: str) -> None:
    """One line why `name` cannot be a new plugin method, or nothing."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise ConfigError(f"new method: {name!r} is not a lower-case Python identifier (a-z, 0-9 and _, starting "
                          f"with a letter): it names the plugin's file, module and option prefix")
    if name in METHODS:
        raise ConfigError(f"new method: {name!r} is already a method of sdesbench; choose another name")
    if importlib.util.find_spec(name) is not None:
        raise ConfigError(f"new method: {name!r} is the name of an installed module, which the plugin file would "
                          f"shadow in its test; choose another name")


def render(name: str, teacher_student: bool) -> dict[str, str]:
    """The three files' names and texts."""
    words = {"name": name, "cls": "".join(p[:1].upper() + p[1:] for p in name.split("_") if p),
             "prefix": option_prefix(name),
             "table": BASE_TABLE, "group": GROUP[teacher_student], "log_softmax": LOG_SOFTMAX}
    words["contract"] = Template(CONTRACT).substitute(words).rstrip("\n")
    plugin, test, spec = (TS_PLUGIN, TS_TEST, TS_SPEC) if teacher_student else (SELF_PLUGIN, SELF_TEST, SELF_SPEC)
    return {f"{name}.py": Template(plugin).substitute(words), f"test_{name}.py": Template(test).substitute(words),
            f"{name}.yaml": Template(spec).substitute(words)}


def write_method(name: str, teacher_student: bool = False, folder: Path | str = ".") -> NewMethod:
    """Write the three files into `folder` (made if missing); refuses, in one line, a bad name or a file
    that is already there (nothing is written then)."""
    check_name(name)
    folder = Path(folder)
    files = render(name, teacher_student)
    for file in files:
        if (folder / file).exists():
            raise ConfigError(f"new method: {folder / file} exists; remove it or choose another name or --dir")
    folder.mkdir(parents=True, exist_ok=True)
    for file, text in files.items():
        write_text(folder / file, text)
    return NewMethod(folder / f"{name}.py", folder / f"test_{name}.py", folder / f"{name}.yaml")


# ------------------------------------------------------------------------------------------ both templates

CONTRACT = '''    logged_terms = ("ss", "${name}")  # the terms loss_terms returns with the default options
    option_prefix = "${prefix}"
    conformance = None  # a fixture under tests/conformance/ once there is reference code to compare with
    no_conformance_because = "a new method: no public reference code to compare with yet"
'''

LOG_SOFTMAX = '''def log_softmax(values):
    top = max(values)
    log_sum = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_sum for v in values]
'''

# ------------------------------------------------------------------------------------------ teacher-student

TS_PLUGIN = '''"""`${name}`: a distillation method for sdesbench, as a plugin (from `sdesbench new method ${name} --teacher-student`).

As written it is pixel-wise knowledge distillation from the teacher at a temperature T (Hinton, Vinyals &
Dean 2015, Sec. 2); change the loss and its equation to yours:

    L = L_SS + ${prefix}weight * L_${name}                                                (Eq. 1)
    L_${name} = T^2 / |P| * sum_{i in P} sum_c p^T_ic * (log p^T_ic - log p^S_ic)        (Eq. 2)
    p^T_i = softmax(z^T_i / T),  p^S_i = softmax(z^S_i / T)

z^S, z^T: the student's and the teacher's logits at pixel i; P: the labelled pixels (label != 255) with
`${prefix}pixels: labelled`, every pixel with `all`. L_SS is the cross-entropy on the labels (+ the aux
head's, weighted by `aux_weight`, when the model has one), as every method of the suite computes it.

Run its table (the table it extends, plus its row):   sdesbench run ${name}.yaml --preset smoke
Test it:                                               python -m pytest test_${name}.py
What a method receives and returns: docs/extending.md of sdesbench.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from sdesbench.config import rng
from sdesbench.methods import METHODS
from sdesbench.methods.teacher_student import TeacherStudentMethod, TeacherStudentOptions

IGNORE = 255  # the label of unlabelled pixels in every dataset of the suite
Pixels = Literal["labelled", "all"]  # the pixels P that Eq. 2 averages over


def ${name}_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
    pixels: Pixels = "labelled",
) -> torch.Tensor:
    """Eq. 2: T^2 x the mean over the pixels P of KL(p^T || p^S), summed over the classes.

    student_logits, teacher_logits: B x C x H x W; labels: B x H x W (255: unlabelled). The teacher is not
    trained (its logits are detached); float32 whatever the training precision.
    """
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # B x H x W
    keep = (labels != IGNORE) if pixels == "labelled" else torch.ones_like(labels, dtype=torch.bool)
    return temperature ** 2 * (kl * keep).sum() / keep.sum().clamp(min=1)


@METHODS.register("${name}")
class ${cls}(TeacherStudentMethod):
    """L = L_SS + ${prefix}weight * L_${name} (module docstring, Eq. 1-2)."""

${contract}

    @dataclass
    class Options(TeacherStudentOptions):  # aux_weight: the aux head's CE weight in L_SS
        ${prefix}weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of L_${name} (Eq. 1)"))
        ${prefix}temperature: float = field(default=4.0, metadata=rng(0.1, 100.0, doc="softmax temperature T (Eq. 2)"))
        ${prefix}pixels: Pixels = "labelled"

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        teacher_out = self.require_teacher(teacher_out)
        terms = self.task_terms(student_out, labels)  # "ss" (and "aux" with an aux head)
        o = self.opts
        loss = ${name}_loss(
            student_out["logits"], teacher_out["logits"], labels, o.${prefix}temperature, o.${prefix}pixels)
        terms["${name}"] = o.${prefix}weight * loss
        return terms
'''

TS_TEST = '''"""Tests of the `${name}` plugin method: Eq. 2 computed by hand, pixel by pixel in plain Python, on a seeded
input; the method's terms. Run with `python -m pytest test_${name}.py`."""
import math

import pytest
import torch
import torch.nn.functional as F

from sdesbench.errors import ConfigError
from sdesbench.methods.base import MethodContext, StepInfo
from ${name} import ${cls}, ${name}_loss

B, C, H, W = 2, 3, 4, 5


def seeded_input():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(B, C, H, W, generator=gen)
    teacher = torch.randn(B, C, H, W, generator=gen)
    labels = torch.randint(0, C, (B, H, W), generator=gen)
    labels[0, 0, :3] = 255  # three unlabelled pixels
    return student, teacher, labels


${log_softmax}

def by_hand(student, teacher, labels, temperature, pixels):
    """Eq. 2 written out: T^2 / |P| * sum over pixels i in P of sum_c p^T_ic (log p^T_ic - log p^S_ic)."""
    total, count = 0.0, 0
    for b in range(B):
        for y in range(H):
            for x in range(W):
                if pixels == "labelled" and labels[b, y, x] == 255:
                    continue
                log_t = log_softmax([teacher[b, c, y, x].item() / temperature for c in range(C)])
                log_s = log_softmax([student[b, c, y, x].item() / temperature for c in range(C)])
                total += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_t, log_s))
                count += 1
    return temperature ** 2 * total / count


@pytest.mark.parametrize("temperature,pixels", [(1.0, "labelled"), (4.0, "labelled"), (4.0, "all")])
def test_loss_equals_the_formula_computed_by_hand(temperature, pixels):
    student, teacher, labels = seeded_input()
    got = ${name}_loss(student, teacher, labels, temperature, pixels).item()
    assert got == pytest.approx(by_hand(student, teacher, labels, temperature, pixels), rel=1e-5, abs=1e-7)


def test_the_method_returns_its_logged_terms_weighted():
    student, teacher, labels = seeded_input()
    opts = ${cls}.parse_options({"${prefix}weight": 0.5})
    method = ${cls}(opts, MethodContext(model=None, num_classes=C, total_iters=1, class_pixel_counts=lambda: None))
    out = {"logits": student, "aux": None, "decoder_feature": None, "stages": []}
    terms = method.loss_terms(out, labels, StepInfo(0, 1), teacher_out={**out, "logits": teacher})
    assert set(terms) == set(${cls}.logged_terms)
    assert terms["ss"].item() == pytest.approx(F.cross_entropy(student, labels, ignore_index=255).item(), rel=1e-6)
    assert terms["${name}"].item() == pytest.approx(0.5 * by_hand(student, teacher, labels, 4.0, "labelled"), rel=1e-5)


def test_options_out_of_range_are_refused():
    with pytest.raises(ConfigError):
        ${cls}.parse_options({"${prefix}temperature": 0.0})
    with pytest.raises(ConfigError):
        ${cls}.parse_options({"${prefix}pixels": "some"})
'''

TS_SPEC = '''# `${name}` beside the rows of ${table} (written by `sdesbench new method ${name} --teacher-student`).
#   sdesbench run ${name}.yaml --preset smoke          (smoke: the built-in tiny data, minutes on a CPU)
# The group keeps the base table's network, protocol and rows; its KL* row distils from the same teacher
# (`teacher: true`: another trained copy of the group's student), so the two compare directly.
extends: ${table}
plugins: [${name}.py]
only_groups: [${group}]
groups:
  - name: ${group}
    rows:
      - {label: ${name}, method: ${name}, teacher: true}
'''

# ---------------------------------------------------------------------------------------------- self-KD

SELF_PLUGIN = '''"""`${name}`: a distillation method for sdesbench, as a plugin (from `sdesbench new method ${name}`).

As written it is a teacher-free self-distillation at a temperature T: the student's class distribution is
pulled towards a virtual teacher made from the label (Tf-KD_reg, Yuan et al. 2020, Eq. 9-10), pixel by
pixel; change the loss and its equation to yours:

    L = L_SS + ${prefix}weight * L_${name}                                                 (Eq. 1)
    q_ic = a if c = y_i else (1 - a) / (C - 1)                                           (Eq. 2)
    L_${name} = T^2 / |V| * sum_{i in V} R_c [ r_ic * (log r_ic - log p_ic) ]              (Eq. 3)
    r_i = softmax(log q_i / T),  p_i = softmax(z_i / T)

y_i: the label of pixel i, V: the labelled pixels (label != 255), z: the student's logits, a:
`${prefix}correct_prob`; R_c is the sum over the C classes (`${prefix}classes: sum`, the KL of each pixel) or
their mean (`mean`, a reduction='mean' of public code). L_SS is the cross-entropy on the labels (+ the aux
head's, weighted by `aux_weight`, when the model has one), as every method of the suite computes it.

Run its table (the table it extends, plus its row):   sdesbench run ${name}.yaml --preset smoke
Test it:                                               python -m pytest test_${name}.py
What a method receives and returns: docs/extending.md of sdesbench.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from sdesbench.config import rng
from sdesbench.methods import METHODS
from sdesbench.methods.student import Student

IGNORE = 255  # the label of unlabelled pixels in every dataset of the suite
Classes = Literal["sum", "mean"]  # R_c of Eq. 3


def ${name}_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, correct_prob: float, temperature: float,
    classes: Classes = "sum",
) -> torch.Tensor:
    """Eq. 3: T^2 x the mean over the labelled pixels of KL(r || p) against the virtual teacher of Eq. 2.

    student_logits: B x C x H x W; labels: B x H x W (255: unlabelled). float32 whatever the training precision.
    """
    num_classes = student_logits.shape[1]
    keep = labels != IGNORE
    target = labels.masked_fill(~keep, 0)
    q = torch.full_like(student_logits, (1.0 - correct_prob) / (num_classes - 1), dtype=torch.float32)
    q.scatter_(1, target.unsqueeze(1), correct_prob)  # Eq. 2
    log_r = F.log_softmax(q.log() / temperature, dim=1)
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = log_r.exp() * (log_r - log_p)  # B x C x H x W
    kl = kl.sum(dim=1) if classes == "sum" else kl.mean(dim=1)
    return temperature ** 2 * (kl * keep).sum() / keep.sum().clamp(min=1)


@METHODS.register("${name}")
class ${cls}(Student):
    """L = L_SS + ${prefix}weight * L_${name} (module docstring, Eq. 1-3). Teacher-free: it needs no teacher."""

${contract}

    @dataclass
    class Options(Student.Options):  # aux_weight: the aux head's CE weight in L_SS
        ${prefix}weight: float = field(default=1.0, metadata=rng(0.0, doc="weight of L_${name} (Eq. 1)"))
        ${prefix}temperature: float = field(default=4.0, metadata=rng(0.1, 100.0, doc="softmax temperature T (Eq. 3)"))
        ${prefix}correct_prob: float = field(default=0.9, metadata=rng(0.01, 0.99, doc="a of Eq. 2"))
        ${prefix}classes: Classes = "sum"

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        terms = super().loss_terms(student_out, labels, step)  # "ss" (and "aux" with an aux head)
        o = self.opts
        loss = ${name}_loss(
            student_out["logits"], labels, o.${prefix}correct_prob, o.${prefix}temperature, o.${prefix}classes)
        terms["${name}"] = o.${prefix}weight * loss
        return terms
'''

SELF_TEST = '''"""Tests of the `${name}` plugin method: Eq. 2-3 computed by hand, pixel by pixel in plain Python, on a seeded
input; the method's terms. Run with `python -m pytest test_${name}.py`."""
import math

import pytest
import torch
import torch.nn.functional as F

from sdesbench.errors import ConfigError
from sdesbench.methods.base import MethodContext, StepInfo
from ${name} import ${cls}, ${name}_loss

B, C, H, W = 2, 3, 4, 5


def seeded_input():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(B, C, H, W, generator=gen)
    labels = torch.randint(0, C, (B, H, W), generator=gen)
    labels[0, 0, :3] = 255  # three unlabelled pixels
    return student, labels


${log_softmax}

def by_hand(student, labels, a, temperature, classes):
    """Eq. 3 written out: T^2 / |V| * sum over labelled pixels of R_c r_c (log r_c - log p_c), with
    r = softmax(log q / T), q_c = a on the label and (1 - a)/(C - 1) elsewhere (Eq. 2)."""
    total, count = 0.0, 0
    for b in range(B):
        for y in range(H):
            for x in range(W):
                label = labels[b, y, x].item()
                if label == 255:
                    continue
                q = [a if c == label else (1 - a) / (C - 1) for c in range(C)]
                log_r = log_softmax([math.log(v) / temperature for v in q])
                log_p = log_softmax([student[b, c, y, x].item() / temperature for c in range(C)])
                kl = [math.exp(lr) * (lr - lp) for lr, lp in zip(log_r, log_p)]
                total += sum(kl) if classes == "sum" else sum(kl) / C
                count += 1
    return temperature ** 2 * total / count


@pytest.mark.parametrize("a,temperature,classes", [(0.9, 1.0, "sum"), (0.9, 4.0, "sum"), (0.6, 4.0, "mean")])
def test_loss_equals_the_formula_computed_by_hand(a, temperature, classes):
    student, labels = seeded_input()
    got = ${name}_loss(student, labels, a, temperature, classes).item()
    assert got == pytest.approx(by_hand(student, labels, a, temperature, classes), rel=1e-5, abs=1e-7)


def test_the_method_returns_its_logged_terms_weighted():
    student, labels = seeded_input()
    opts = ${cls}.parse_options({"${prefix}weight": 0.5})
    method = ${cls}(opts, MethodContext(model=None, num_classes=C, total_iters=1, class_pixel_counts=lambda: None))
    out = {"logits": student, "aux": None, "decoder_feature": None, "stages": []}
    terms = method.loss_terms(out, labels, StepInfo(0, 1))
    assert set(terms) == set(${cls}.logged_terms)
    assert terms["ss"].item() == pytest.approx(F.cross_entropy(student, labels, ignore_index=255).item(), rel=1e-6)
    assert terms["${name}"].item() == pytest.approx(0.5 * by_hand(student, labels, 0.9, 4.0, "sum"), rel=1e-5)


def test_options_out_of_range_are_refused():
    with pytest.raises(ConfigError):
        ${cls}.parse_options({"${prefix}correct_prob": 1.0})
    with pytest.raises(ConfigError):
        ${cls}.parse_options({"${prefix}classes": "max"})
'''

SELF_SPEC = '''# `${name}` beside the teacher-free rows of ${table} (written by `sdesbench new method ${name}`).
#   sdesbench run ${name}.yaml --preset smoke          (smoke: the built-in tiny data, minutes on a CPU)
# The group keeps the base table's network, protocol and rows (Student, LSR, Tf-KD, SAD, SR-SS, SDES).
extends: ${table}
plugins: [${name}.py]
only_groups: [${group}]
groups:
  - name: ${group}
    rows:
      - {label: ${name}, method: ${name}}
'''
