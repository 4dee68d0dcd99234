"""The method contract (sdesbench/methods/base.py, docs/extending.md): what each method declares on its class,
read here for every registered method (nothing lists methods by hand), and what the base class gives it: the
random-number generator (seeded from run seed and rank, exactly resumed) and its own parameter groups; the
one way to add pixel KD (`features.PixelKD`); and the acceptance test of issue 26: a new built-in method is its
file and its docs section, nothing else. The terms a method logs are checked against its `logged_terms` where
it trains (tests/test_matrix.py)."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import PolynomialLR

from sdesbench.config import TrainConfig
from sdesbench.engine import step
from sdesbench.methods import METHODS
from sdesbench.methods.base import Method, MethodContext, StepInfo
from sdesbench.methods.features import PixelKD
from sdesbench.methods.student import Student

DOCS = Path(__file__).resolve().parent.parent / "docs"


def option_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls.Options)}


def test_every_method_declares_its_logged_terms():
    for name in METHODS.names():
        assert "logged_terms" in vars(METHODS.get(name)), f"{name}: its class does not declare its logged terms"
        terms = METHODS.get(name).logged_terms
        assert isinstance(terms, tuple) and terms and all(isinstance(t, str) and t for t in terms), name
        assert len(set(terms)) == len(terms), name


def allowed_prefixes(name: str, option: str) -> set[str]:
    """The prefixes option `option` of method `name` may carry: the method's own, those of the method classes
    it derives from, and those of the other registered methods whose options it reuses (a composite's)."""
    cls = METHODS.get(name)
    out = {cls.option_prefix}
    out |= {k.option_prefix for k in cls.__mro__[1:] if isinstance(k, type) and issubclass(k, Method)
            and k.option_prefix}
    out |= {METHODS.get(n).option_prefix for n in METHODS.names()
            if n != name and METHODS.get(n).option_prefix and option in option_names(METHODS.get(n))}
    return out


def test_option_names_carry_the_prefix_of_the_method_that_owns_them():
    for name in METHODS.names():
        cls = METHODS.get(name)
        if not cls.option_prefix:  # methods whose option names predate the rule
            continue
        assert re.fullmatch(r"[a-z][a-z0-9]*_", cls.option_prefix), (name, cls.option_prefix)
        inherited = set().union(*(option_names(k) for k in cls.__mro__[1:] if isinstance(k, type)
                                   and issubclass(k, Method) and k not in {METHODS.get(n) for n in METHODS.names()}))
        for option in option_names(cls) - inherited:
            assert any(option.startswith(p) for p in allowed_prefixes(name, option)), (name, option)


def documented_names() -> set[str]:
    """Method names in backticks at the start of a docs heading, or in the first cell of a docs table row."""
    names = set()
    for page in DOCS.glob("*.md"):
        for line in page.read_text().splitlines():
            if line.startswith("#"):
                names |= set(re.findall(r"`([^`]+)`", line))
            elif line.startswith("| `"):
                names.add(line.split("`")[1])
    return names


def test_every_method_has_a_docs_section():
    missing = [n for n in METHODS.names() if n not in documented_names()]
    assert not missing, f"methods without a heading (or a table row) of their own in docs/: {missing}"


# ----------------------------------------------------------------------------- the generator


def ctx(seed: int = 0, rank: int = 0) -> MethodContext:
    return MethodContext(model=None, num_classes=3, total_iters=4, class_pixel_counts=lambda: None, seed=seed,
                         rank=rank)


def student(seed: int = 0, rank: int = 0) -> Student:
    return Student(Student.parse_options({}), ctx(seed, rank))


def test_the_generator_resumes_exactly_and_differs_per_rank_and_seed():
    a = student()
    a.rand(5)  # iterations before the checkpoint
    saved = a.generator.get_state()
    at_k = a.rand(2, 3)
    resumed = student()  # a new process: built from the seed, then the checkpoint's state
    resumed.generator.set_state(saved)
    assert torch.equal(resumed.rand(2, 3), at_k)
    assert torch.equal(student().rand(4), student().rand(4))  # a function of (seed, rank) alone
    assert not torch.equal(student(rank=1).rand(4), student().rand(4))
    assert not torch.equal(student(seed=1).rand(4), student().rand(4))
    torch.manual_seed(0)  # the run's global generator is another stream
    assert not torch.equal(torch.rand(4), student().rand(4))
    g = student()
    n = g.randn(3, device="cpu")
    assert n.shape == (3,) and n.dtype == torch.float32


# ----------------------------------------------------------------------------- parameter groups


class WithAdapter(Student):
    """A test method whose adapter trains at 10 x the base learning rate."""

    @dataclass
    class Options(Student.Options):
        pass

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.adapter = nn.Conv2d(2, 2, 1)

    def param_groups(self, base_lr):
        return [{"params": list(self.adapter.parameters()), "lr": 10 * base_lr}]


def test_param_groups_give_method_modules_their_learning_rate_under_the_schedule(monkeypatch):
    monkeypatch.setitem(METHODS._entries, "with-adapter", WithAdapter)
    monkeypatch.setattr(WithAdapter, "name", "with-adapter")
    learner = step.random_learner("enet", "with-adapter", 3, train=TrainConfig(iters=4, lr=0.01))
    main, own = learner.optimizer.param_groups
    adapter = set(map(id, learner.method.adapter.parameters()))
    assert {id(p) for p in own["params"]} == adapter and own["lr"] == pytest.approx(0.1)
    assert not adapter & {id(p) for p in main["params"]} and main["lr"] == pytest.approx(0.01)
    assert len(main["params"]) == len(list(learner.model.parameters()))
    sched = PolynomialLR(learner.optimizer, total_iters=4, power=0.9)
    learner.optimizer.step()
    sched.step()  # (1 - 1/4)^0.9 of each group's lr
    assert [g["lr"] for g in learner.optimizer.param_groups] == pytest.approx([0.01 * 0.75 ** 0.9, 0.1 * 0.75 ** 0.9])


def test_declared_max_grad_norm_clips_the_group_by_hand():
    """A group with `max_grad_norm` 15 whose gradients have norm sqrt(30^2 + 40^2 + 0^2 + 120^2) = 130 is scaled
    by 15 / 130 (torch adds 1e-6 to the norm); a group under its limit and a group without one are untouched."""
    big, small, free = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    big.grad, small.grad, free.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([3.0, 4.0]), torch.tensor([300.0, 0.0])
    extra = nn.Parameter(torch.zeros(1))
    extra.grad = torch.tensor([120.0])
    opt = torch.optim.SGD([{"params": [free]}, {"params": [big, extra], "max_grad_norm": 15.0},
                           {"params": [small], "max_grad_norm": 15.0}], lr=1.0)
    step.clip_declared_grad_norms(opt, torch.amp.GradScaler("cuda", enabled=False))
    factor = 15.0 / (130.0 + 1e-6)
    torch.testing.assert_close(big.grad, torch.tensor([30.0, 40.0, 0.0]) * factor)
    torch.testing.assert_close(extra.grad, torch.tensor([120.0]) * factor)
    assert torch.equal(small.grad, torch.tensor([3.0, 4.0])) and torch.equal(free.grad, torch.tensor([300.0, 0.0]))


def test_afdcd_step_clips_its_loss_module_before_the_update():
    """Af-DCD through the one training step: with `afdcd_max_grad_norm` the align + projector gradients the step
    applied are the unclipped run's scaled by min(1, max / norm), and the update used them (SGD lr 1, first step,
    no weight decay: p_after = p_before - grad); the student's gradients are the same in both runs."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    grads, updates, student = {}, {}, {}
    for limit in (0.0, 1e-3):
        learner = step.random_learner("enet", "afdcd", 3, options={"afdcd_max_grad_norm": limit},
                                      train=TrainConfig(iters=1, lr=1.0, weight_decay=0.0))
        assert len(learner.optimizer.param_groups) == (2 if limit else 1)
        block = list(learner.method.generator_block.parameters())
        before = [p.detach().clone() for p in block]
        step.train_step(learner, images, labels, StepInfo(0, 1))
        grads[limit] = [p.grad.clone() for p in block]
        updates[limit] = [(b - p.detach(), b.abs().max().item()) for b, p in zip(before, block)]
        student[limit] = [p.grad.clone() for p in learner.model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads[0.0]])).item()
    assert norm > 1e-3  # the limit bites
    for raw, clipped, (update, scale) in zip(grads[0.0], grads[1e-3], updates[1e-3]):
        torch.testing.assert_close(clipped, raw * (1e-3 / (norm + 1e-6)), rtol=1e-4, atol=1e-12)
        # p_before - p_after in float32 is exact to an ulp of the weights (~6e-8 of their magnitude)
        torch.testing.assert_close(update, clipped, rtol=1e-4, atol=1.2e-7 * scale)
    for a, b in zip(student[0.0], student[1e-3]):
        torch.testing.assert_close(a, b)



# ----------------------------------------------------------------------------- pixel KD composites


def test_each_pixel_kd_composite_is_its_method_plus_the_kl_term():
    """Every registered `PixelKD` composite returns its method's terms, unchanged and in their order, then `kd`:
    kd_weight * T^2 * mean over labelled pixels of KL(p^T || p^S) (Hinton et al. 2015), written out here."""
    registered = {METHODS.get(n) for n in METHODS.names()}
    composites = [n for n in METHODS.names() if issubclass(METHODS.get(n), PixelKD)]
    assert len(composites) >= 3  # cirkd+kd, fitnet+kd, rdd+kl
    g = torch.Generator().manual_seed(0)
    model = SimpleNamespace(decoder_channels=4, stage_channels=[3, 5])

    def out():
        return {"logits": torch.randn(2, 3, 8, 8, generator=g), "aux": None,
                "decoder_feature": torch.randn(2, 4, 4, 4, generator=g),
                "stages": [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]}

    s, t = out(), out()
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    labels[:, 0] = 255
    small = {"cirkd_pixel_memory": 64, "cirkd_region_memory": 8}
    for name in composites:
        cls = METHODS.get(name)
        base = next(k for k in cls.__mro__[1:] if k in registered and not issubclass(k, PixelKD))
        opts = {k: v for k, v in small.items() if k in option_names(cls)}
        terms = []
        for method_cls, extra in ((base, {}), (cls, {"kd_weight": 0.5, "kd_temperature": 2.0})):
            torch.manual_seed(0)  # the same adapters, queues and draws for both
            ctx = MethodContext(model=model, num_classes=3, total_iters=4, class_pixel_counts=lambda: None,
                                teacher=model)
            method = method_cls(method_cls.parse_options({**opts, **extra}, 3), ctx)
            terms.append(method.loss_terms(s, labels, StepInfo(3, 4), t))
        alone, composite = terms
        assert list(composite) == [*alone, "kd"], name
        assert all(torch.equal(composite[k], alone[k]) for k in alone), name
        p_t, log_p_s = torch.softmax(t["logits"] / 2, 1), torch.log_softmax(s["logits"] / 2, 1)
        kl = (p_t * (p_t.log() - log_p_s)).sum(1)[labels != 255].mean()
        assert composite["kd"].item() == pytest.approx(0.5 * 4 * kl.item(), rel=1e-5), name
        assert cls.logged_terms == base.logged_terms + ("kd",), name


# ----------------------------------------------------------------------------- a new built-in method

ACCEPTANCE = '''
import sys
from pathlib import Path

import torch

import sdesbench
from sdesbench.config import TrainConfig
from sdesbench.engine import step
from sdesbench.methods import METHODS
from sdesbench.methods.base import StepInfo

assert Path(sdesbench.__file__).resolve().is_relative_to(Path.cwd().resolve()), sdesbench.__file__
name = "masked-kd"
assert name in METHODS.names()

import test_coverage
import test_matrix
import test_method_api
import test_tskd

# the method x model matrix runs it on a DeepLabV3 and on another network
assert sorted(test_matrix.family(m) for m in test_matrix.PAIRS if any(n == name for n, _ in test_matrix.PAIRS[m])) \\
    == ["deeplabv3", "other"]
# the end-to-end teacher-student run trains it and checks its logged terms
assert name in test_tskd.TS_METHODS and f"method: {name}," in test_tskd.E2E_SPEC
# its declarations: conformance (a reason), logged terms, option prefix, docs section
test_coverage.test_every_registered_method_has_a_conformance_fixture_or_a_reason()
test_method_api.test_every_method_declares_its_logged_terms()
test_method_api.test_option_names_carry_the_prefix_of_the_method_that_owns_them()
test_method_api.test_every_method_has_a_docs_section()
# what the matrix checks of each pair, here on the smallest network: it trains and logs what it declares
torch.manual_seed(0)
learner = step.random_learner("enet", name, 11, train=TrainConfig(iters=10))
x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 11, (2, 32, 32))
logged = set()
for it in (0, 9):
    terms = step.train_step(learner, x, y, StepInfo(it, 10))
    assert all(torch.isfinite(v) for v in terms.values()), terms
    logged |= set(terms)
assert logged == set(METHODS.get(name).logged_terms), logged
print("ok")
'''


def test_a_new_builtin_method_is_one_file_and_its_docs_section(tmp_path):
    """The acceptance test of issue 26: in a copy of the package, tests and docs, the example method of
    docs/extending.md is added as a built-in (its file and its docs section, nothing else), and every test
    collection derived from the registry includes it: the matrix's pairs, the teacher-student end-to-end spec,
    the conformance coverage, the declarations, the docs check; it trains and logs the terms it declares."""
    root = DOCS.parent
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("sdesbench", "tests", "docs"):
        shutil.copytree(root / part, tmp_path / part, ignore=ignore)
    guide = (root / "docs" / "extending.md").read_text()
    example = guide.split("```python\n", 1)[1].split("```", 1)[0]
    assert '@METHODS.register("masked-kd")' in example
    (tmp_path / "sdesbench" / "methods" / "masked_kd.py").write_text(example)
    with (tmp_path / "docs" / "methods-tskd.md").open("a") as page:
        page.write("\n## `masked-kd` — pixel KD on a random subset of the pixels (docs/extending.md's example)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(tmp_path / p) for p in ("", "tests", "tests/conformance"))}
    proc = subprocess.run([sys.executable, "-c", ACCEPTANCE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
    assert "masked-kd" not in METHODS.names()  # the checkout itself is untouched
