"""The hook contract (engine/state.py): priorities decide the order, hooks keep state across a resume,
and a method that updates parameters of its own does it inside the one training step, exactly resumed, as are
the draws from its generator."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from conftest import stop_at
from sdesbench.config import TrainConfig
from sdesbench.engine import step
from sdesbench.engine.configure import build_config
from sdesbench.engine.state import HookBase, Hooks, Priority
from sdesbench.engine.trainer import Trainer, train
from sdesbench.errors import Interrupted
from sdesbench.io import load_checkpoint
from sdesbench.methods import METHODS
from sdesbench.methods.base import StepInfo
from sdesbench.methods.losses import pixel_ce
from sdesbench.methods.student import Student


def test_hooks_run_by_priority_and_unwind_in_reverse():
    calls = []

    def hook(name, priority):
        class Recorder(HookBase):
            def before_train(self, trainer):
                calls.append(("before", name))

            def after_train(self, trainer):
                calls.append(("after", name))

        Recorder.priority = priority
        return Recorder()

    hooks = [hook("c", Priority.LOW), hook("a", Priority.HIGHEST), hook("b1", Priority.NORMAL),
             hook("b2", Priority.NORMAL)]
    run = Hooks(hooks)
    run.before_train(None)
    run.after_train(None)
    assert calls == [("before", "a"), ("before", "b1"), ("before", "b2"), ("before", "c"),
                     ("after", "c"), ("after", "b2"), ("after", "b1"), ("after", "a")]
    # a hook that fails to start (a logger's missing package): the ones before it are closed, the ones after it
    # never started and are not, and its error is the one raised
    calls.clear()
    failing = hook("b1", Priority.NORMAL)
    failing.before_train = lambda trainer: (_ for _ in ()).throw(RuntimeError("b1 cannot start"))
    run = Hooks([hook("a", Priority.HIGHEST), failing, hook("c", Priority.LOW)])
    with pytest.raises(RuntimeError, match="b1 cannot start"):
        try:
            run.before_train(None)
        finally:
            run.after_train(None)
    assert calls == [("before", "a"), ("after", "a")]


def test_the_builtin_hooks_declare_the_order_their_dependencies_need():
    from sdesbench.engine.hooks import CheckpointHook, LogHook, PeriodicEvaluationHook, ProgressHook, SignalHook
    from sdesbench.engine.loggers import LoggersHook

    p = {h: h.priority for h in (SignalHook, LogHook, LoggersHook, ProgressHook, PeriodicEvaluationHook,
                                 CheckpointHook)}
    assert p[SignalHook] < p[LogHook] <= p[LoggersHook] < p[ProgressHook]  # writers open before publishers
    assert p[PeriodicEvaluationHook] < p[CheckpointHook]  # a checkpoint holds its iteration's evaluation


class StepCounter(HookBase):
    """Counts the steps it has seen; its count travels in the checkpoint. It also notes the stages it saw
    after the steps (the final evaluation is the loop's, observed in `after_final_evaluation`)."""

    def __init__(self):
        self.steps = 0
        self.stages = []

    def after_step(self, trainer):
        self.steps += 1
        self.stages = []

    def after_final_evaluation(self, trainer):
        final = trainer.state.final
        self.stages.append(("final", trainer.state.iteration, final.images, final.metrics["student"]["miou"]))

    def after_train(self, trainer):
        self.stages.append(("after_train", trainer.state.final is not None))

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


class OwnUpdate(Student):
    """A test method with a parameter of its own, `w`, updated by its own SGD (momentum, to test resume):
    the student's loss uses w (as a discriminator is used by the generator's loss); its own loss pulls w
    towards the mean of the student's last logits."""

    @dataclass
    class Options(Student.Options):
        pass

    def __init__(self, options, ctx):
        super().__init__(options, ctx)
        self.w = nn.Parameter(torch.tensor(0.5))
        self.kept = None

    def loss_terms(self, student_out, labels, step_info, teacher_out=None):
        logits = student_out["logits"]
        self.kept = logits.detach().float().mean()
        # a random weight from the method's generator: the resumed run must draw what the straight one drew
        mask = self.rand(1, device=logits.device)
        return {"ss": pixel_ce(logits, labels), "adv": 0.1 * mask * self.w * logits.float().mean()}

    def own_optimizer(self, train):
        return torch.optim.SGD([self.w], lr=0.3, momentum=0.9)

    def own_loss_terms(self, step_info):
        return {"d": (self.w - self.kept) ** 2}


@pytest.fixture
def own_method(monkeypatch):
    monkeypatch.setitem(METHODS._entries, "own-update", OwnUpdate)
    OwnUpdate.name = "own-update"
    return "own-update"


def test_a_methods_own_parameters_are_updated_by_its_own_optimizer_in_the_one_step(own_method):
    torch.manual_seed(0)
    learner = step.random_learner("enet", own_method, 11, train=TrainConfig(iters=4))
    w = learner.method.w
    assert all(p is not w for g in learner.optimizer.param_groups for p in g["params"])  # not the student's SGD
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 11, (2, 32, 32))
    w0 = float(w.detach())
    terms = step.train_step(learner, x, y, StepInfo(0, 4))
    assert set(terms) == {"ss", "adv"} and set(learner.own_terms) == {"d"}
    kept = float(learner.method.kept)
    # its own loss alone moved it (the student's loss gave it a gradient too, dropped before its update):
    # first SGD step with momentum = plain step, w1 = w0 - lr * 2 (w0 - kept)
    assert float(w.detach()) == pytest.approx(w0 - 0.3 * 2 * (w0 - kept), rel=1e-6)
    assert float(learner.own_terms["d"]) == pytest.approx((w0 - kept) ** 2, rel=1e-6)


def test_own_optimizer_and_hook_state_resume_bitwise(tmp_path, monkeypatch, own_method):
    """8 iterations straight vs 4 + SIGTERM + resume: the method's own parameter, its optimizer's momentum,
    its generator (whose draws weigh its `adv` term) and a hook's state are the same as without the
    interruption."""
    torch.set_num_threads(1)
    counters = []

    def with_counter(self):
        counters.append(StepCounter())
        return original(self) + [counters[-1]]

    original = Trainer.build_hooks
    monkeypatch.setattr(Trainer, "build_hooks", with_counter)

    def cfg(out):
        return build_config({}, [f"method.name={own_method}", "model.name=enet", "train.iters=8", "data.batch_size=2",
                                 "data.crop=32", "eval.max_images=2", "train.checkpoint_every=4",
                                 f"output.dir={out}", "output.tensorboard=false"])

    straight = train(cfg(tmp_path / "straight"), show_progress=False)

    monkeypatch.setattr(Trainer, "build_hooks", lambda self: with_counter(self) + [stop_at(4)])
    with pytest.raises(Interrupted):
        train(cfg(tmp_path / "resumed"), show_progress=False)
    monkeypatch.setattr(Trainer, "build_hooks", with_counter)
    resumed = train(cfg(tmp_path / "resumed"), resume="required", show_progress=False)

    assert counters[0].steps == 8 and counters[1].steps == 4 and counters[2].steps == 8
    # the final evaluation ran once the schedule was complete, hooks saw it before after_train; a run stopped
    # by a signal has none
    assert counters[0].stages == [("final", 8, 2, straight.metrics.miou), ("after_train", True)]
    assert counters[1].stages == [("after_train", False)]
    assert counters[2].stages == [("final", 8, 2, resumed.metrics.miou), ("after_train", True)]
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert torch.equal(a["method"]["w"], b["method"]["w"])
    assert len(a["method_generators"]) == 1 and torch.equal(a["method_generators"][0], b["method_generators"][0])
    assert torch.equal(a["method_optimizer"]["state"][0]["momentum_buffer"],
                       b["method_optimizer"]["state"][0]["momentum_buffer"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["hooks"]["StepCounter"] == b["hooks"]["StepCounter"] == {"steps": 8}
    assert straight.metrics == resumed.metrics
