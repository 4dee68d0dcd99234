"""The method contract (sdesbench/methods/base.py, docs/extending.md): what each method declares on its class,
read here for every registered method (nothing lists methods by hand), and what the base class gives it: the
random-number generator (seeded from run seed and rank, exactly resumed) and its own parameter groups.
The terms a method logs are checked against its `logged_terms` where it trains (tests/test_matrix.py)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import PolynomialLR

from sdesbench.config import TrainConfig
from sdesbench.engine import step
from sdesbench.methods import METHODS
from sdesbench.methods.base import Method, MethodContext
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
