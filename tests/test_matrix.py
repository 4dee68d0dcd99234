"""Every method works with every model: one training step and one evaluation, in-process, tiny input.

The paper applies SDES to DeepLabV3 (four backbones), ERFNet, ESNet and ENet, and the baselines to
several of them; the output-dict contract is what makes any pair work. This checks each pair for a
finite loss, a backward pass, and extra evaluation predictions (Ens-T) shaped like the logits.
"""
import pytest
import torch

from sdesbench.data.base import class_pixel_counts
from sdesbench.data.tiny import TinyScenes
from sdesbench.methods.base import MethodContext, StepInfo
from sdesbench.models import build_model
from sdesbench.registry import METHODS, MODELS

MODELS_UNDER_TEST = [m for m in MODELS.names() if m != "deeplabv3_resnet101"]  # R101: a teacher only
CASES = [(name, {}) for name in METHODS.names()] + [("sdes", {"expert": "student", "n_experts": 2})]


@pytest.fixture(scope="module")
def counts():
    return class_pixel_counts(TinyScenes(None, "train"))


@pytest.mark.parametrize("model_name", MODELS_UNDER_TEST)
def test_every_method_trains_and_evaluates_with_model(model_name, counts):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 56)  # non-square, not a multiple of 16
    y = torch.randint(0, 11, (2, 40, 56))
    y[:, :3] = 255
    for method_name, options in CASES:
        cls = METHODS.get(method_name)
        model = build_model(model_name, 11)
        teacher = build_model(model_name, 11).eval() if cls.needs_teacher else None
        method = cls(cls.parse_options(options, 11), MethodContext(
            model=model, num_classes=11, total_iters=10, class_pixel_counts=lambda: counts, teacher=teacher))
        n_student = sum(p.numel() for p in model.parameters())
        teacher_out = None
        if teacher is not None:
            with torch.no_grad():
                teacher_out = teacher(x)
        # an early and a late step: warm-ups and staged losses (SAD, Tf-FD, RDD) take both paths;
        # RDD's late stage alone can be empty between two random networks (no pixel hard for just one)
        loss = 0
        for it in (0, 9):
            terms = method.loss_terms(model(x), y, StepInfo(it, 10), teacher_out)
            assert all(torch.isfinite(v) for v in terms.values()), (model_name, method_name, it, terms)
            loss = loss + sum(terms.values())
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), method_name
        model.eval()
        method.eval()
        with torch.no_grad():
            out = model(x)
            for name, logits in method.eval_predictions(out, y).items():
                assert logits.shape == out["logits"].shape == (2, 11, 40, 56), (method_name, name)
        # the method's own modules never enter the deployed student
        assert sum(p.numel() for p in model.parameters()) == n_student
