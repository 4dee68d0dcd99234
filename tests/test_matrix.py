"""Methods x models: two training steps and one evaluation, in-process, tiny input.

The paper applies SDES to DeepLabV3 (four backbones), ERFNet, ESNet and ENet, and the baselines to
several of them; the output-dict contract is what makes any pair work. Each pair runs the suite's one
training step (`engine.step.train_step`, as the Trainer does) for a finite loss and a student that
changes, and logs the terms its class declares (`logged_terms`), then evaluates, checking extra evaluation
predictions (Ens-T) are shaped like the logits.

The matrix samples rather than taking the full product, so it grows by two pairs per new method, not
by one per model: every model runs the student and SDES (both expert kinds: the paper's method on each
of its networks), and every other method runs on one DeepLabV3 and one network of another family (`PAIRS`).
Which ones is a function of the method's name alone (rendezvous hashing: the model whose hash with the name
ranks first), so adding a method never moves another one, and adding a model moves only the methods it wins.
Teacher-size networks (over `MAX_STUDENT_PARAMS`, listed in `TEACHERS_ONLY`) stay out of the matrix, so
that a new large model does not lengthen it; a model over that size and not listed fails here.
"""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from sdesbench.config import TrainConfig
from sdesbench.data.base import class_pixel_counts
from sdesbench.data.tiny import TinyScenes
from sdesbench.engine import step
from sdesbench.methods import METHODS
from sdesbench.methods.base import StepInfo
from sdesbench.models import MODELS, count_params

TEACHERS_ONLY = ("deeplabv3_resnet101", "deeplabv3_resnet101_cirkd", "segformer_mit_b4", "pspnet_r101_d8")  # teacher-size: never in the matrix
MAX_STUDENT_PARAMS = 45_000_000  # DeepLabV3-ResNet-50, the largest student of the paper's tables, has 39.6 M
MODELS_UNDER_TEST = [m for m in MODELS.names() if m not in TEACHERS_ONLY]
ON_EVERY_MODEL = [("student", {}), ("sdes", {}), ("sdes", {"expert": "student", "n_experts": 2})]


def family(model: str) -> str:
    return "deeplabv3" if model.startswith("deeplabv3") else "other"


def models_of(method: str, models: list[str] = MODELS_UNDER_TEST) -> list[str]:
    """A method's two models: in each family, the one whose sha256 with the method's name is largest."""
    def score(model: str) -> bytes:
        return hashlib.sha256(f"{method}|{model}".encode()).digest()

    return [max((m for m in models if family(m) == f), key=score) for f in ("deeplabv3", "other")]


def sampled_pairs(methods: list[str] | None = None) -> dict[str, list[tuple[str, dict]]]:
    """model -> the (method, options) cases it runs (module docstring); `methods`: the registered ones."""
    pairs = {m: list(ON_EVERY_MODEL) for m in MODELS_UNDER_TEST}
    on_every = {n for n, _ in ON_EVERY_MODEL}
    for name in METHODS.names() if methods is None else methods:
        if name not in on_every:
            for model in models_of(name):
                pairs[model].append((name, {}))
    return pairs


PAIRS = sampled_pairs()


def test_the_sample_covers_every_method_on_a_deeplabv3_and_another_network():
    seen = [(model, name) for model, cases in PAIRS.items() for name, _ in cases]
    assert {name for _, name in seen} == set(METHODS.names())
    on_every = {n for n, _ in ON_EVERY_MODEL}
    for name in METHODS.names():
        models = {model for model, n in seen if n == name}
        if name in on_every:
            assert models == set(MODELS_UNDER_TEST), name
        else:
            assert sorted(family(m) for m in models) == ["deeplabv3", "other"], (name, models)


def test_a_methods_models_do_not_depend_on_the_other_methods():
    names = [n for n in METHODS.names() if n not in {m for m, _ in ON_EVERY_MODEL}]
    alone = {name: models_of(name) for name in names}
    for dropped in names[:3]:  # the registry without one method, or with one more
        for pairs in (sampled_pairs([n for n in names if n != dropped]), sampled_pairs(names + ["a-new-method"])):
            placed = {name: sorted(m for m, cases in pairs.items() for n, _ in cases if n == name) for name in names}
            assert all(placed[n] == sorted(alone[n]) for n in names if n != dropped)


@pytest.fixture(scope="module")
def counts():
    return class_pixel_counts(TinyScenes(None, "train"))


@pytest.mark.parametrize("model_name", MODELS_UNDER_TEST)
def test_every_method_trains_and_evaluates_with_model(model_name, counts):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 56)  # non-square, not a multiple of 16
    y = torch.randint(0, 11, (2, 40, 56))
    y[:, :3] = 255
    for method_name, options in PAIRS[model_name]:
        learner = step.random_learner(model_name, method_name, 11, options, train=TrainConfig(iters=10),
                                      class_pixel_counts=lambda: counts)
        model, method = learner.model, learner.method
        n_student = count_params(model)
        assert n_student <= MAX_STUDENT_PARAMS, f"{model_name} is teacher-size: list it in TEACHERS_ONLY"
        before = [p.detach().clone() for p in model.parameters()]
        own_before = [p.detach().clone() for p in method.parameters()]
        # an early and a late step: warm-ups and staged losses (SAD, Tf-FD, RDD) take both paths;
        # RDD's late stage alone can be empty between two random networks (no pixel hard for just one)
        logged = set()
        for it in (0, 9):
            terms = step.train_step(learner, x, y, StepInfo(it, 10))
            assert all(torch.isfinite(v) for v in terms.values()), (model_name, method_name, it, terms)
            logged |= set(terms) | set(learner.own_terms)
        if not options:  # the terms a method declares it logs (with its defaults, on a model without aux head)
            assert logged == set(METHODS.get(method_name).logged_terms), (model_name, method_name, logged)
        if METHODS.get(method_name).student_is_teacher:  # its run trains the method's own parameters alone
            assert all(torch.equal(b, p) for b, p in zip(before, model.parameters())), method_name
            assert any(not torch.equal(b, p) for b, p in zip(own_before, method.parameters())), method_name
            assert not model.training, method_name  # the frozen teacher stays in eval mode while the unit trains
        else:
            assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), method_name
        model.eval()
        method.eval()
        with torch.no_grad():
            out = model(x)
            for name, logits in method.eval_predictions(out, y).items():
                assert logits.shape == out["logits"].shape == (2, 11, 40, 56), (method_name, name)
        # the method's own modules never enter the deployed student
        assert count_params(model) == n_student



@pytest.mark.parametrize("student, teacher", [("segformer_mit_b0", "deeplabv3_resnet18_cirkd"),
                                              ("deeplabv3_resnet18_cirkd", "segformer_mit_b0")])
def test_feature_methods_across_cnn_and_transformer(student, teacher):
    """CIRKD's DeepLabV3-R18 (fused feature 128 channels at stride 8) and SegFormer MiT-B0 (256 channels at
    stride 4), each as teacher of the other. CWD on the decoder feature passes the student map through its 1x1
    adapter and resizes it to the teacher's grid: the term equals Shu et al. Eq. 3 written out here on those
    maps. CWD and CIRKD (which resizes the student feature to the teacher's, then projects it) train."""
    x, y = torch.randn(2, 3, 48, 64), torch.randint(0, 11, (2, 48, 64))
    learner = step.random_learner(student, "cwd", 11, {"cwd_on": "decoder_feature"}, train=TrainConfig(iters=10),
                                  teacher_model=teacher)
    shapes = {"segformer_mit_b0": (256, 12, 16), "deeplabv3_resnet18_cirkd": (128, 6, 8)}
    with torch.no_grad():
        s_out, t_out = learner.model(x), learner.teacher(x)
        term = learner.method.loss_terms(s_out, y, StepInfo(0, 10), t_out)["cwd"]
        s, t = s_out["decoder_feature"], t_out["decoder_feature"]
        assert (s.shape[1:], t.shape[1:]) == (shapes[student], shapes[teacher])
        tau = 4.0
        s = F.interpolate(learner.method.cwd.adapter(s), size=t.shape[-2:], mode="bilinear", align_corners=False)
        p_t = torch.softmax(t.flatten(2) / tau, dim=2)
        kl = (p_t * (torch.log(p_t) - torch.log_softmax(s.flatten(2) / tau, dim=2))).sum()
    assert term.item() == pytest.approx(3.0 * tau ** 2 * kl.item() / (2 * t.shape[1]), rel=1e-4)
    for method, built in (("cwd", learner), ("cirkd", None)):
        built = built or step.random_learner(student, method, 11, {}, train=TrainConfig(iters=10), teacher_model=teacher)
        before = [p.detach().clone() for p in built.model.parameters()]
        terms = step.train_step(built, x, y, StepInfo(0, 10))
        assert all(torch.isfinite(v) for v in terms.values()) and len(terms) > 1, (method, terms)
        assert any(not torch.equal(b, p) for b, p in zip(before, built.model.parameters())), method
