"""`skd` and the adversarial piece CIRKD's composites share (methods/adversarial.py): hand-computed losses, the
discriminator's shape and size rules, its two spectral-norm forms, its own update inside the one training step
(its own optimizer, never the student's), an exact resume (2 + resume + 2 iterations = 4 straight, bitwise on
a CPU) and its gradients averaged over ranks under DDP (2 gloo processes). The numbers against the public
reference code are in tests/conformance/test_conformance_skd.py.

Every expected number below is worked out in the comment beside it.
"""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import stop_at
from sdesbench.config import TrainConfig
from sdesbench.engine import step
from sdesbench.engine.configure import build_config
from sdesbench.engine.trainer import Trainer, train
from sdesbench.errors import Interrupted
from sdesbench.io import load_checkpoint
from sdesbench.methods import METHODS
from sdesbench.methods.adversarial import (ScoreMapDiscriminator, generator_adversarial_loss, gradient_penalty,
                                           hinge_discriminator_loss, score_map_size, wasserstein_discriminator_loss)
from sdesbench.methods.base import MethodContext, StepInfo
from sdesbench.methods.skd import node_patch, pairwise_distillation_loss, pairwise_similarity

CLASSES = 11


def build(name, **options):
    model = SimpleNamespace(decoder_channels=4, stage_channels=[3, 5])
    ctx = MethodContext(model=model, num_classes=CLASSES, total_iters=4, class_pixel_counts=lambda: None)
    cls = METHODS.get(name)
    return cls(cls.parse_options(options, CLASSES), ctx)


# ----------------------------------------------------------------------------- pair-wise


def test_pairwise_loss_hand_computed():
    # one image, 2 channels, 1 x 2 positions (nodes of 1 pixel). Student positions (1, 0) and (0, 1): a^s = I.
    # Teacher positions (1, 0) and (3, 0): both along the same direction, a^t = all ones.
    # (a^s - a^t)^2 = [[0, 1], [1, 0]]: mean over the 4 pairs = 0.5
    student = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    teacher = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]])
    assert pairwise_similarity(student).squeeze(0).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert pairwise_distillation_loss(student, teacher, pool=1).item() == pytest.approx(0.5, rel=1e-6)
    # the detached norm divides by ||f|| + 1e-8: the same value up to 1e-8
    assert pairwise_distillation_loss(student, teacher, pool=1, detach_norm=True).item() == pytest.approx(0.5, 1e-6)
    # pooled into one 2x2 node (max over the patch) both graphs are the 1 x 1 matrix [1]: no loss
    one_node = pairwise_distillation_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 5, 2, 2))
    assert one_node.item() == pytest.approx(0.0, abs=1e-6)


def test_nodes_and_the_student_resized_to_the_teacher():
    assert node_patch((9, 13), 2, 0.0) == (2, 2)
    assert node_patch((9, 13), 2, 0.5) == (4, 6)  # the authors' int(size * 0.5)
    assert node_patch((1, 3), 2, 0.5) == (1, 1)  # never an empty patch
    # a constant student feature of another size is resized to the teacher's 4x4 and pooled to 2x2 nodes:
    # all its nodes point the same way (a^s = 1); the teacher's 4 nodes are orthogonal (a^t = I):
    # (1 - I)^2 has 12 ones in 16 pairs: 0.75
    teacher = torch.zeros(1, 4, 4, 4)
    for k, (i, j) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        teacher[0, k, i, j] = 1.0
    assert pairwise_distillation_loss(torch.ones(1, 3, 2, 2), teacher).item() == pytest.approx(0.75, rel=1e-6)


def test_pairwise_gradient_reaches_the_student_only_and_the_detached_norm_changes_it():
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    t = torch.randn(2, 4, 6, 6, requires_grad=True)
    pairwise_distillation_loss(s, t).backward()
    assert s.grad is not None and t.grad is None
    g_normalize = s.grad.clone()
    s.grad = None
    pairwise_distillation_loss(s, t, detach_norm=True).backward()
    assert not torch.allclose(s.grad, g_normalize)


# ----------------------------------------------------------------------------- the adversarial losses


def test_adversarial_losses_hand_computed():
    d_teacher = torch.tensor([0.5, 2.0])
    d_student = torch.tensor([-0.5, 0.3])
    # generator: -mean D(Q^s) = -(-0.5 + 0.3) / 2 = 0.1
    assert generator_adversarial_loss(d_student).item() == pytest.approx(0.1, rel=1e-6)
    # hinge: mean relu(1 - [0.5, 2]) = mean [0.5, 0] = 0.25; mean relu(1 + [-0.5, 0.3]) = mean [0.5, 1.3] = 0.9
    assert hinge_discriminator_loss(d_teacher, d_student).item() == pytest.approx(1.15, rel=1e-6)
    # Wasserstein: mean D(Q^s) - mean D(Q^t) = -0.1 - 1.25
    assert wasserstein_discriminator_loss(d_teacher, d_student).item() == pytest.approx(-1.35, rel=1e-6)


class HalfSquare(nn.Module):
    """D(x) = 1/2 sum x^2 per image, so dD/dx = x."""

    def forward(self, x):
        return 0.5 * x.pow(2).sum((1, 2, 3), keepdim=True)


def test_gradient_penalty_hand_computed():
    # real = 2, fake = 0 on 2x2 maps; alpha = 1/4 and 1/2: mixed = 0.5 and 1.0 everywhere.
    # dD/dx = mixed: norms 0.5 * 2 = 1 and 1 * 2 = 2; penalty = mean((1 - 1)^2, (2 - 1)^2) = 0.5
    real, fake = torch.full((2, 1, 2, 2), 2.0), torch.zeros(2, 1, 2, 2)
    alpha = torch.tensor([0.25, 0.5]).view(2, 1, 1, 1)
    assert gradient_penalty(HalfSquare(), real, fake, alpha).item() == pytest.approx(0.5, rel=1e-6)


def test_score_maps_are_read_at_one_eighth_and_at_least_the_discriminators_64_pixels():
    assert score_map_size((512, 1024), 8) == (64, 128)  # Cityscapes crops: CIRKD's 1/8 logits
    assert score_map_size((513, 513), 8) == (65, 65)  # rounded up, as a stride-8 network
    assert score_map_size((360, 480), 8) == (64, 64)  # CamVid's 360 crops would give 45 x 60: below 64
    assert score_map_size((32, 32), 8) == (64, 64)
    assert score_map_size((100, 70), 1) == (100, 70)


def test_discriminator_shape_and_size_are_cirkds():
    d = ScoreMapDiscriminator(5)
    assert d(torch.randn(2, 5, 64, 64)).shape == (2, 1, 1, 1)
    assert d(torch.randn(2, 5, 128, 96)).shape == (2, 1, 5, 3)  # 128 / 16 - 3, 96 / 16 - 3
    # CIRKD's utils/sagan.py Discriminator(input_channel=5): four 4x4 convolutions 5->64->128->256->512, two
    # self-attention blocks (query/key to C/8, value to C, gamma), a 4x4 convolution to 1, BN on the input
    convs = sum(16 * a * b + b for a, b in [(5, 64), (64, 128), (128, 256), (256, 512)]) + 16 * 512 + 1
    attention = sum(2 * (c * c // 8 + c // 8) + c * c + c + 1 for c in (256, 512))
    assert sum(p.numel() for p in d.parameters()) == convs + attention + 2 * 5


def test_the_two_spectral_norms_agree_forward_and_for_one_call_and_differ_when_calls_share_a_backward():
    torch.manual_seed(0)
    ours = ScoreMapDiscriminator(3)
    shared = ScoreMapDiscriminator(3, spectral_norm="shared")
    shared.load_state_dict(ours.state_dict())
    a, b = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours(a), shared(a), rtol=1e-5, atol=1e-6)  # one power iteration each, same vectors
    assert torch.allclose(ours.down[0].weight_u, shared.down[0].weight_u, atol=1e-6)

    def grads(d, calls):
        d.zero_grad()
        sum(d(x).sum() for x in calls).backward()
        return torch.cat([d.down[k].weight_orig.grad.flatten() for k in range(4)])

    one, one_shared = grads(ours, [a]), grads(shared, [a])
    assert torch.allclose(one, one_shared, rtol=1e-4, atol=1e-7)
    two, two_shared = grads(ours, [a, b]), grads(shared, [a, b])
    relative = float((two - two_shared).norm() / two.norm())
    assert 0 < relative < 0.1  # the shared form differentiates both sigmas with the second call's vectors


# ----------------------------------------------------------------------------- the method and its own update


def test_defaults_are_cirkds_rows_and_the_pure_methods_stay_pure():
    skd = METHODS.get("skd").Options()
    assert (skd.kd_weight, skd.skd_weight, skd.skd_pool, skd.adv_weight, skd.adv_d_weight) == (1.0, 10.0, 2, 0.001, 0.1)
    assert (skd.adv_loss, skd.adv_d_optimizer, skd.adv_d_lr, skd.adv_d_schedule) == ("hinge", "adam", 4e-4, "constant")
    ifvd = METHODS.get("ifvd+kd+adv").Options()
    assert (ifvd.ifvd_weight, ifvd.kd_weight, ifvd.adv_weight, ifvd.adv_d_weight) == (20.0, 1.0, 0.001, 0.1)
    cwd = METHODS.get("cwd+kd+adv").Options()
    assert (cwd.cwd_weight, cwd.cwd_on, cwd.cwd_feature_weight, cwd.cwd_feature_on, cwd.cwd_tau) == \
        (3.0, "logits", 50.0, "decoder_feature", 4.0)
    assert (cwd.kd_weight, cwd.adv_weight, cwd.adv_d_weight) == (1.0, 0.001, 0.1)
    for pure in ("ifvd", "cwd"):
        names = {f for f in vars(METHODS.get(pure).Options()).keys()}
        assert not {n for n in names if n.startswith(("kd_", "adv_"))}, pure
        assert METHODS.get(pure).own_optimizer(build(pure), TrainConfig()) is None


def test_without_adversarial_weights_there_is_no_discriminator():
    m = build("skd", adv_weight=0.0, adv_d_weight=0.0)
    assert m.adversary is None and m.own_optimizer(TrainConfig()) is None
    assert not [k for k in m.state_dict() if "discriminator" in k]


def test_own_optimizers_are_cirkds_adam_or_the_authors_sgd():
    adam = build("skd").own_optimizer(TrainConfig())
    assert isinstance(adam, torch.optim.Adam)
    assert adam.defaults["lr"] == 4e-4 and adam.defaults["betas"] == (0.9, 0.99) and adam.defaults["weight_decay"] == 0
    sgd = build("skd", adv_d_optimizer="sgd", adv_d_lr=1e-3).own_optimizer(TrainConfig(momentum=0.8, weight_decay=5e-4))
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (1e-3, 0.8, 5e-4)


def test_the_students_term_reaches_the_student_and_ds_loss_only_d():
    m = build("skd")
    s = torch.randn(2, CLASSES, 32, 32, requires_grad=True)
    t = torch.randn(2, CLASSES, 32, 32)
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    terms = m.kd_and_adversarial_terms({"logits": s}, labels, {"logits": t})
    torch.autograd.grad(terms["adv"], s)  # raises if the term had no path to the student's logits
    assert m.adversary.kept[0].shape == (2, CLASSES, 64, 64)  # 32 / 8 = 4, below D's 64: resized up
    own = m.own_loss_terms(StepInfo(0, 4))
    assert set(own) == {"adv_d"} and m.adversary.kept is None
    own["adv_d"].backward()
    assert s.grad is None and all(p.grad is not None for p in m.adversary.discriminator.parameters())
    with pytest.raises(RuntimeError, match="before the student's loss"):
        m.own_loss_terms(StepInfo(1, 4))


@pytest.mark.parametrize("name", ["skd", "ifvd+kd+adv", "cwd+kd+adv"])
def test_the_discriminator_is_updated_by_its_own_optimizer_in_the_one_step(name):
    torch.manual_seed(0)
    learner = step.random_learner("enet", name, CLASSES, train=TrainConfig(iters=4))
    d_params = list(learner.method.adversary.discriminator.parameters())
    ids = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    assert not ids & {id(p) for p in d_params}  # not the student's SGD
    assert [id(p) for p in learner.method_optimizer.param_groups[0]["params"]] == [id(p) for p in d_params]
    before = [p.detach().clone() for p in d_params]
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, CLASSES, (2, 32, 32))
    terms = step.train_step(learner, x, y, StepInfo(0, 4))
    assert {"kd", "adv"} <= set(terms) and set(learner.own_terms) == {"adv_d"}
    assert all(torch.isfinite(v) for v in [*terms.values(), *learner.own_terms.values()])
    # Adam moves every parameter with a non-zero gradient (the attention's query/key/value get none while its
    # gamma is still 0, as in a fresh SAGAN), and the convolutions have one
    for before_p, p in zip(before, d_params):
        assert torch.equal(before_p, p) == (not bool(p.grad.abs().sum() > 0))
    assert all(not torch.equal(a, p) for a, p in zip(before, d_params) if p.dim() == 4 and p.shape[-1] == 4)


# ----------------------------------------------------------------------------- exact resume


@pytest.fixture(scope="module")
def enet_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("skd_teacher")
    train(build_config({}, ["model.name=enet", "train.iters=1", "data.batch_size=2", "data.crop=32",
                            "eval.max_images=1", f"output.dir={out}", "output.tensorboard=false"]), show_progress=False)
    return out / "checkpoints" / "last.pt"


def assert_same(a, b, where="state"):
    """Bitwise equality of nested checkpoint states (tensors, dicts, lists, numbers)."""
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("options", [[], ["method.adv_loss=wgan-gp", "method.adv_d_optimizer=sgd",
                                          "method.adv_d_schedule=poly", "method.adv_spectral_norm=shared"]],
                         ids=["cirkd_hinge_adam", "authors_wgan_gp_sgd_poly"])
def test_skd_resumes_bitwise(tmp_path, monkeypatch, enet_teacher, options):
    """4 iterations straight vs 2 + SIGTERM + resume + 2: the student, the discriminator (weights, spectral-norm
    vectors, BN statistics), its optimizer's state and the metrics are the same bit for bit."""
    torch.set_num_threads(1)

    def cfg(out):
        return build_config({}, ["method.name=skd", "model.name=enet", "teacher.model=enet",
                                 f"teacher.checkpoint={enet_teacher}", "train.iters=4", "train.checkpoint_every=2",
                                 "data.batch_size=2", "data.crop=32", "eval.max_images=2", "train.log_every=1",
                                 f"output.dir={out}", "output.tensorboard=false", *options])

    straight = train(cfg(tmp_path / "straight"), show_progress=False)

    original = Trainer.build_hooks
    monkeypatch.setattr(Trainer, "build_hooks", lambda self: original(self) + [stop_at(2)])
    with pytest.raises(Interrupted):
        train(cfg(tmp_path / "resumed"), show_progress=False)
    monkeypatch.setattr(Trainer, "build_hooks", original)
    resumed = train(cfg(tmp_path / "resumed"), resume="required", show_progress=False)

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert any(k.startswith("adversary.discriminator.down.0.weight_u") for k in a["method"])
    for key in ("model", "method", "optimizer", "method_optimizer", "scaler"):
        assert_same(a[key], b[key], key)
    assert straight.metrics == resumed.metrics
    logs = [(tmp_path / run / "log.jsonl").read_text().splitlines() for run in ("straight", "resumed")]
    terms = [[{k: v for k, v in json.loads(line).items() if k in ("iter", "adv", "adv_d", "adv_gp")}
              for line in log if '"iter"' in line and '"adv_d"' in line] for log in logs]
    assert terms[0] == terms[1] and [t["iter"] for t in terms[0]] == [1, 2, 3, 4]
    if options:
        assert "adv_gp" in terms[0][0]
        # the poly schedule of D: lr = 4e-4 (1 - 3/4)^0.9 at the last iteration (0-based 3 of 4)
        lr = a["method_optimizer"]["param_groups"][0]["lr"]
        assert lr == pytest.approx(4e-4 * 0.25 ** 0.9, rel=1e-12)


# ----------------------------------------------------------------------------- DDP: D's gradients averaged


def _ddp_own_update_worker(rank: int, world: int, init_file: str, out_dir: str, options: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        learner = step.random_learner("enet", "skd", CLASSES, options, train=TrainConfig(iters=2))
        assert isinstance(learner.unit, nn.parallel.DistributedDataParallel)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
        x, y = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, CLASSES, (2, 32, 32), generator=gen)
        # this rank's own gradient of D, on a copy (so its forward passes leave the real D's buffers alone) and
        # with the random stream the real step will see (ENet's dropout)
        local = copy.deepcopy(learner.plain_unit)
        rng = torch.get_rng_state()
        with torch.no_grad():
            teacher_out = learner.teacher(x)
        local(x, y, StepInfo(0, 2), teacher_out)
        own = local.method.own_loss_terms(StepInfo(0, 2))
        local_grads = torch.autograd.grad(sum(own.values()), list(local.method.adversary.discriminator.parameters()))
        torch.set_rng_state(rng)
        step.train_step(learner, x, y, StepInfo(0, 2))
        d = learner.method.adversary.discriminator
        torch.save({"local": [g.detach() for g in local_grads], "ddp": [p.grad.detach() for p in d.parameters()],
                    "weights": [p.detach() for p in d.parameters()], "own": float(learner.own_terms["adv_d"].detach()),
                    "own_local": float(own["adv_d"].detach())},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("options", [{}, {"adv_loss": "wgan-gp", "adv_spectral_norm": "shared"}],
                         ids=["hinge", "wgan_gp"])
def test_under_ddp_the_discriminators_own_update_averages_its_gradients_over_ranks(tmp_path, options):
    """Each rank's own D gradient (computed on a copy, on its own batch) against the gradient DDP leaves after
    the one step: their mean on both ranks; D's weights then stay equal across ranks (the gradient penalty's
    double backward included)."""
    mp.spawn(_ddp_own_update_worker, args=(2, str(tmp_path / "init"), str(tmp_path), options), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["own"] != r1["own"]  # the ranks saw different batches
    assert r0["own"] == r0["own_local"] and r1["own"] == r1["own_local"]  # the copy saw what the real step saw
    assert any(not torch.allclose(a, b) for a, b in zip(r0["local"], r1["local"]))
    for g0, g1, d0, d1 in zip(r0["local"], r1["local"], r0["ddp"], r1["ddp"]):
        assert torch.equal(d0, d1)
        assert torch.allclose(d0, (g0 + g1) / 2, rtol=1e-5, atol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))
    assert math.isfinite(r0["own"])
