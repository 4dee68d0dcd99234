"""`cirkd` and `cirkd+kd` (Yang et al., CVPR 2022): hand-computed losses and queue updates, mixed precision,
a resumed run bitwise equal to an uninterrupted one (weights and queues), two gloo ranks against one process
on the concatenated batch (`cirkdv2` too, whose gathers are these), a torchrun training on two CPU ranks, and CIRKD's per-dataset weights set in a
table spec.

Every expected number is worked out in the comment beside it; sigma = the logistic function,
ln(sigma(x) / sigma(-x)) = x and sigma(x) - sigma(-x) = tanh(x / 2).
"""
from __future__ import annotations

import math
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import ROOT, cli_env, read_json
from sdesbench.engine.configure import build_config
from sdesbench.engine.state import HookBase, Priority
from sdesbench.engine.trainer import Trainer, train
from sdesbench.errors import ConfigError, Interrupted
from sdesbench.experiments.plan import Sweep
from sdesbench.experiments.spec import load_spec
from sdesbench.io import load_checkpoint
from sdesbench.methods import METHODS
from sdesbench.methods.base import MethodContext, StepInfo
from sdesbench.methods.cirkd import (RelationMemory, batch_pixel_pair_loss, memory_relation_loss,
                                     pixel_embeddings)
from sdesbench.methods.kl import KL

E1, E2 = [1.0, 0.0], [0.0, 1.0]


def feature(*images):
    """B x D x 1 x W from per-image lists of per-pixel vectors (one row of pixels)."""
    return torch.tensor(images, dtype=torch.float32).permute(0, 2, 1).unsqueeze(2)


def build(name="cirkd", num_classes=2, s_ch=2, t_ch=2, **options):
    ctx = MethodContext(model=SimpleNamespace(decoder_channels=s_ch), num_classes=num_classes, total_iters=4,
                        class_pixel_counts=lambda: None, teacher=SimpleNamespace(decoder_channels=t_ch))
    cls = METHODS.get(name)
    return cls(cls.parse_options(options, num_classes), ctx)


def outputs(feat, num_classes=2, logits=None):
    b, _, h, w = feat.shape
    return {"logits": torch.zeros(b, num_classes, h, w) if logits is None else logits, "aux": None,
            "decoder_feature": feat}


# ----------------------------------------------------------------------------- the loss functions


def test_batch_pixel_pair_loss_hand_computed():
    tau = 1.0
    # Teacher: both images hold pixels [e1, e2], so every S^T_ij = I; each row at tau 1 is (sigma(1), sigma(-1)).
    teacher = feature([E1, E2], [E1, E2])
    # Student equal to the teacher: 0.
    assert float(batch_pixel_pair_loss(*[pixel_embeddings(teacher)] * 4, tau)) == pytest.approx(0.0, abs=1e-7)
    # Student image 0 = [e1, e2], image 1 = [e2, e1]: S_00 = S_11 = I (KL 0); S_01 = S_10 = [[0, 1], [1, 0]]: each
    # row's distribution is the teacher's reversed, KL = (sigma(1) - sigma(-1)) ln(sigma(1)/sigma(-1)) = tanh(1/2).
    # L = 1/B^2 sum_ij 1/A sum_a KL = (0 + 0 + tanh(1/2) + tanh(1/2)) / 4 = tanh(1/2) / 2.
    student = 3.0 * feature([E1, E2], [E2, E1])  # lengths do not matter: embeddings are normalised
    s, t = pixel_embeddings(student), pixel_embeddings(teacher)
    assert float(batch_pixel_pair_loss(s, t, s, t, tau)) == pytest.approx(math.tanh(0.5) / 2, rel=1e-6)
    # Student constant e1: every S^S_ij is all ones, uniform rows: KL(p || uniform) = ln 2 - H(p), p = sigma(1/tau)
    p = 1 / (1 + math.exp(-10.0))
    expected = math.log(2) + p * math.log(p) + (1 - p) * math.log(1 - p)
    flat = pixel_embeddings(feature([E1, E1], [E1, E1]))
    assert float(batch_pixel_pair_loss(flat, t, flat, t, 0.1)) == pytest.approx(expected, rel=1e-6)
    # anchors only image 0 against both keys (what one of two ranks computes): (0 + tanh(1/2)) / (1 * 2)
    assert float(batch_pixel_pair_loss(s[:1], t[:1], s, t, tau)) == pytest.approx(math.tanh(0.5) / 2, rel=1e-6)


def test_memory_relation_loss_hand_computed():
    contrast = torch.tensor([E1, E2])
    # Teacher anchor e1 -> logits (1, 0) / tau; student anchor e2 -> (0, 1) / tau. tau 1: KL = tanh(1/2).
    t, s = torch.tensor([E1]), torch.tensor([E2])
    assert float(memory_relation_loss(s, t, contrast, 1.0)) == pytest.approx(math.tanh(0.5), rel=1e-6)
    # tau 0.5 and KD temperature 2: logits / (tau T) = (1, 0) again, the KL tanh(1/2), times T^2 = 4
    assert float(memory_relation_loss(s, t, contrast, 0.5, 2.0)) == pytest.approx(4 * math.tanh(0.5), rel=1e-6)
    # a second anchor identical on both sides adds 0: the mean over the 2 anchors halves it
    t2, s2 = torch.tensor([E1, E2]), torch.tensor([E2, E2])
    assert float(memory_relation_loss(s2, t2, contrast, 1.0)) == pytest.approx(math.tanh(0.5) / 2, rel=1e-6)


def test_gradients_reach_the_student_and_the_projection_only():
    m = build(cirkd_pixel_memory=20, cirkd_region_memory=4)
    s = torch.randn(2, 2, 3, 3, requires_grad=True)
    t = torch.randn(2, 2, 3, 3, requires_grad=True)
    labels = torch.randint(0, 2, (2, 3, 3))
    terms = m.loss_terms(outputs(s), labels, StepInfo(0, 1), outputs(t))
    assert set(terms) == {"ss", "cirkd_batch", "cirkd_pixel", "cirkd_region"}
    sum(v for k, v in terms.items() if k.startswith("cirkd")).backward()
    assert s.grad is not None and t.grad is None
    assert all(p.grad is not None for p in m.cirkd.projection.parameters())


# ----------------------------------------------------------------------------- the queues

A, B_ = [0.6, 0.8], [-1.0, 0.0]
# image 0: pixels 0, 1 of class 1 (e2), pixels 2..5 of class 0 (e1)
# image 1: pixels 0..3 of class 0 (e1, a, e1, a), pixel 4 ignored (b), pixel 5 of class 1 (e2)
ENQUEUED = feature([E2, E2, E1, E1, E1, E1], [E1, A, E1, A, B_, E2])
ENQUEUED_LABELS = torch.tensor([[[1, 1, 0, 0, 0, 0]], [[0, 0, 0, 0, 255, 1]]])


def memory(enqueue_from="class_pixels"):
    torch.manual_seed(0)
    return RelationMemory(2, 2, pixel_memory=5, region_memory=3, enqueue_pixels=3, enqueue_from=enqueue_from)


def test_enqueue_writes_regions_and_pixels_at_the_pointers_by_hand():
    mem = memory()
    before = mem.pixel_queue.clone(), mem.region_queue.clone()
    mem.enqueue(ENQUEUED, ENQUEUED_LABELS)
    # regions: per image and class one slot at the pointer (then +1 mod 3): class 0 slots 0 (image 0: mean of e1's
    # = e1) and 1 (image 1: mean of e1, a, e1, a = (0.8, 0.4), normalised (2, 1)/sqrt5); class 1 slots 0, 1 = e2
    q = mem.region_queue
    assert torch.allclose(q[0, 0], torch.tensor(E1)) and torch.allclose(q[0, 1], torch.tensor([2, 1]) / math.sqrt(5))
    assert torch.allclose(q[1, :2], torch.tensor([E2, E2]))
    assert torch.equal(q[:, 2], before[1][:, 2]) and mem.region_ptr.tolist() == [2, 2]
    # pixels, 3 per class and image: class 0, image 0 (4 pixels): slots 0..2, pointer 3; image 1 (4 pixels):
    # 3 + 3 >= 5, so the last 3 slots (2..4) and the pointer restarts at 0. Class 1: image 0 (2 pixels) slots 0..1,
    # image 1 (1 pixel) slot 2, pointer 3; its slots 3, 4 keep their initial vectors.
    p = mem.pixel_queue
    assert mem.pixel_ptr.tolist() == [0, 3]
    assert all(any(torch.allclose(p[0, k], torch.tensor(v)) for v in (E1, A)) for k in range(5))
    assert torch.allclose(p[1, :3], torch.tensor([E2, E2, E2])) and torch.equal(p[1, 3:], before[0][1, 3:])
    assert not any(torch.allclose(p[c, k], torch.tensor(B_)) for c in range(2) for k in range(5))  # ignored: never
    assert p.dtype == q.dtype == torch.float32


def test_first_n_positions_enqueues_the_reference_positions_of_any_class():
    # the reference indexes the image with randperm(n)[:K]: for image 1's class 1 (n = 1) that is position 0,
    # a class-0 pixel (e1), stored in class 1's queue at slot 2
    mem = memory("first_n_positions")
    mem.enqueue(ENQUEUED, ENQUEUED_LABELS)
    assert torch.allclose(mem.pixel_queue[1, 2], torch.tensor(E1))
    assert mem.pixel_ptr.tolist() == [0, 3] and mem.region_ptr.tolist() == [2, 2]  # same pointers, same regions
    default = memory()
    default.enqueue(ENQUEUED, ENQUEUED_LABELS)
    assert torch.allclose(default.pixel_queue[1, 2], torch.tensor(E2))
    assert torch.equal(mem.region_queue, default.region_queue)


def test_contrast_sets_take_the_same_random_slots_of_every_class():
    queue = torch.arange(2 * 5 * 1, dtype=torch.float32).view(2, 5, 1)  # class c, slot k holds 5c + k
    torch.manual_seed(3)
    slots = torch.randperm(5)[:2]
    torch.manual_seed(3)
    assert RelationMemory.sample(queue, 2).flatten().tolist() == [*slots.tolist(), *(slots + 5).tolist()]


def test_queues_are_registered_buffers_and_the_pointers_travel_with_them():
    m = build(num_classes=3, t_ch=4, cirkd_pixel_memory=20, cirkd_region_memory=4)
    state = m.state_dict()
    assert state["cirkd.memory.pixel_queue"].shape == (3, 20, 4) and state["cirkd.memory.region_queue"].shape == (3, 4, 4)
    assert state["cirkd.memory.pixel_ptr"].dtype == state["cirkd.memory.region_ptr"].dtype == torch.long
    assert torch.allclose(state["cirkd.memory.pixel_queue"].norm(dim=2), torch.ones(3, 20))  # unit vectors


def test_a_batch_without_labelled_pixels_gives_zero_memory_terms_and_keeps_the_projection_in_the_graph():
    m = build(cirkd_pixel_memory=20, cirkd_region_memory=4)
    s = torch.randn(1, 2, 2, 2, requires_grad=True)
    labels = torch.full((1, 2, 2), 255)
    before = torch.get_rng_state()
    terms = m.loss_terms(outputs(s), labels, StepInfo(0, 1), outputs(torch.randn(1, 2, 2, 2)))
    assert float(terms["cirkd_pixel"].detach()) == float(terms["cirkd_region"].detach()) == 0.0
    assert m.cirkd.memory.pixel_ptr.tolist() == [0, 0]  # nothing enqueued
    assert not torch.equal(before, torch.get_rng_state())  # the contrast slots were drawn all the same
    (terms["cirkd_pixel"] + terms["cirkd_region"]).backward()
    assert all(p.grad is not None for p in m.cirkd.projection.parameters())


# ----------------------------------------------------------------------------- options, sizes, precision


def test_options_weights_and_one_line_errors():
    cls = METHODS.get("cirkd")
    o = cls.Options()
    assert (o.cirkd_batch_weight, o.cirkd_pixel_weight, o.cirkd_region_weight, o.cirkd_tau) == (1.0, 0.1, 0.1, 0.1)
    assert (o.cirkd_pixel_memory, o.cirkd_region_memory, o.cirkd_pixel_contrast, o.cirkd_region_contrast,
            o.cirkd_enqueue_pixels) == (20000, 2000, 4096, 1024, 16)
    with pytest.raises(ConfigError, match="cirkd_enqueue_pixels=16 exceeds method.cirkd_pixel_memory=8"):
        cls.parse_options({"cirkd_pixel_memory": 8})
    with pytest.raises(ConfigError, match="cirkd_batch_scope"):
        cls.parse_options({"cirkd_batch_scope": "world"})
    # train_cirkd.py's split of the contrast sizes: total // classes + 1 per class
    m = build(num_classes=19, cirkd_pixel_memory=16, cirkd_region_memory=2)
    assert (m.cirkd.pixel_per_class, m.cirkd.region_per_class) == (4096 // 19 + 1, 1024 // 19 + 1) == (216, 54)


def test_weights_scale_their_terms_and_the_student_feature_is_resized_to_the_teachers():
    torch.manual_seed(0)
    s, t = torch.randn(2, 2, 2, 3), torch.randn(2, 3, 4, 6)
    labels = torch.randint(0, 2, (2, 8, 12))
    terms = {}
    for weight in (1.0, 0.5):
        torch.manual_seed(2)  # the same projection head and initial queues
        m = build(t_ch=3, cirkd_pixel_memory=20, cirkd_region_memory=4, cirkd_batch_weight=weight,
                  cirkd_pixel_weight=weight, cirkd_region_weight=weight)
        torch.manual_seed(1)
        terms[weight] = m.loss_terms(outputs(s, logits=torch.zeros(2, 2, 8, 12)), labels, StepInfo(0, 1), outputs(t))
    for k in ("cirkd_batch", "cirkd_pixel", "cirkd_region"):
        assert float(terms[0.5][k].detach()) == pytest.approx(0.5 * float(terms[1.0][k].detach()), rel=1e-6)
    # the batch term equals the pure function on the student map resized (bilinear) to the teacher's 4 x 6
    up = F.interpolate(s, size=(4, 6), mode="bilinear", align_corners=False)
    e_s, e_t = pixel_embeddings(up), pixel_embeddings(t)
    assert float(terms[1.0]["cirkd_batch"].detach()) == pytest.approx(float(batch_pixel_pair_loss(e_s, e_t, e_s, e_t, 0.1)),
                                                            rel=1e-6)


def test_pooling_averages_both_maps_before_the_batch_term():
    torch.manual_seed(0)
    s, t = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    m = build(cirkd_pixel_memory=20, cirkd_region_memory=4, cirkd_batch_pool=2)
    got = m.cirkd.batch_term(s, t)
    # 2 x 2 windows, ceil mode: rows (0, 1) and (2); the window over row 2 alone averages its 2 pixels
    pooled_s = torch.stack([s[..., 0:2, :].unflatten(-1, (2, 2)).mean((-3, -1)),
                            s[..., 2:3, :].unflatten(-1, (2, 2)).mean((-3, -1))], dim=-2)
    pooled_t = torch.stack([t[..., 0:2, :].unflatten(-1, (2, 2)).mean((-3, -1)),
                            t[..., 2:3, :].unflatten(-1, (2, 2)).mean((-3, -1))], dim=-2)
    e_s, e_t = pixel_embeddings(pooled_s), pixel_embeddings(pooled_t)
    assert float(got) == pytest.approx(float(batch_pixel_pair_loss(e_s, e_t, e_s, e_t, 0.1)), rel=1e-6)


def test_under_bf16_autocast_the_relations_are_float32_and_the_queues_stay_float32():
    # bf16 features inside autocast give the float32 value of the same (rounded) numbers: nothing was
    # computed in bf16 (a bf16 matmul at tau 0.1 would differ by about 1e-2)
    torch.manual_seed(0)
    s = torch.randn(2, 8, 4, 4).bfloat16()
    t = torch.randn(2, 8, 4, 4).bfloat16()
    m = build(s_ch=8, t_ch=8, cirkd_pixel_memory=20, cirkd_region_memory=4)
    exact = m.cirkd.batch_term(s.float(), t.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m.cirkd.batch_term(s, t)
        terms = m.loss_terms(outputs(s), torch.randint(0, 2, (2, 4, 4)), StepInfo(0, 1), outputs(t))
    assert low.dtype == torch.float32 and float(low) == pytest.approx(float(exact), rel=1e-6)
    assert all(v.dtype == torch.float32 for k, v in terms.items() if k.startswith("cirkd"))
    assert m.cirkd.memory.pixel_queue.dtype == m.cirkd.memory.region_queue.dtype == torch.float32
    assert m.cirkd.memory.pixel_ptr.sum() > 0


def test_cirkd_plus_kd_adds_the_kl_term():
    torch.manual_seed(0)
    s, t = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    s_logits, t_logits = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2)
    labels = torch.randint(0, 2, (1, 2, 2))
    torch.manual_seed(2)
    both = build("cirkd+kd", cirkd_pixel_memory=20, cirkd_region_memory=4, kd_temperature=2.0)
    torch.manual_seed(2)
    pure = build("cirkd", cirkd_pixel_memory=20, cirkd_region_memory=4)
    torch.manual_seed(1)
    got = both.loss_terms(outputs(s, logits=s_logits), labels, StepInfo(0, 1), outputs(t, logits=t_logits))
    torch.manual_seed(1)
    alone = pure.loss_terms(outputs(s, logits=s_logits), labels, StepInfo(0, 1), outputs(t, logits=t_logits))
    kl = KL(KL.parse_options({"kd_temperature": 2.0}),
            MethodContext(model=None, num_classes=2, total_iters=1, class_pixel_counts=lambda: None))
    expected_kd = kl.loss_terms({"logits": s_logits, "aux": None}, labels, StepInfo(0, 1), {"logits": t_logits})["kd"]
    assert set(got) == set(alone) | {"kd"}
    assert float(got["kd"]) == pytest.approx(float(expected_kd), rel=1e-6)
    assert all(float(got[k].detach()) == pytest.approx(float(alone[k].detach()), rel=1e-6) for k in alone)


# ----------------------------------------------------------------------------- CIRKD's per-dataset weights


def test_a_voc_group_sets_cirkds_voc_weights_in_the_spec(tmp_path):
    # CIRKD's train_scripts/train_cirkd/voc/*.sh: --lambda-memory-pixel 0.01 --lambda-memory-region 0.01
    spec_file = tmp_path / "cirkd_voc.yaml"
    spec_file.write_text("""
title: CIRKD weights per dataset
dataset: tiny
presets:
  smoke: {data: {name: tiny, crop: [32, 32], batch_size: 2}, train: {iters: 2}}
groups:
  - name: VOC
    model: deeplabv3_resnet18
    options: {cirkd+kd: {cirkd_pixel_weight: 0.01, cirkd_region_weight: 0.01}}
    rows:
      - {label: CIRKD, method: cirkd+kd, teacher: deeplabv3_resnet18}
  - name: Cityscapes
    model: deeplabv3_resnet18
    rows:
      - {label: CIRKD, method: cirkd+kd, teacher: deeplabv3_resnet18}
""")
    plans = {p.key: p for p in Sweep(str(spec_file), "smoke", (0,), tmp_path).plans(load_spec(str(spec_file)))}
    voc, citys = plans["VOC/CIRKD"].cfg.method.options, plans["Cityscapes/CIRKD"].cfg.method.options
    assert (voc["cirkd_pixel_weight"], voc["cirkd_region_weight"], voc["cirkd_batch_weight"]) == (0.01, 0.01, 1.0)
    assert (citys["cirkd_pixel_weight"], citys["cirkd_region_weight"]) == (0.1, 0.1)


@pytest.mark.parametrize("table, reference", [("cirkd_ade20k", 35.41), ("cirkd_coco_stuff164k", 33.11)])
def test_cirkd_tables_have_the_cirkd_row_with_the_default_weights(table, reference, tmp_path):
    spec = load_spec(table)
    (row,) = [r for g in spec.groups for r in g.rows if r.label == "CIRKD"]
    assert (row.method, row.teacher, row.miou) == ("cirkd+kd", "deeplabv3_resnet101_cirkd", reference)
    (plan,) = [p for p in Sweep(table, "paper", (0,), tmp_path).plans(spec) if p.key.endswith("/CIRKD")]
    opts = plan.cfg.method.options
    assert (opts["cirkd_batch_weight"], opts["cirkd_pixel_weight"], opts["cirkd_region_weight"]) == (1.0, 0.1, 0.1)


# ----------------------------------------------------------------------------- resume


def test_two_iterations_interrupted_and_resumed_equal_four_straight_weights_and_queues(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    common = ["model.name=deeplabv3_resnet18", "data.batch_size=2", "data.crop=32", "eval.max_images=2",
              "output.tensorboard=false"]
    train(build_config({}, [*common, "train.iters=1", f"output.dir={tmp_path / 'teacher'}"]), show_progress=False)
    teacher = tmp_path / "teacher" / "checkpoints" / "last.pt"

    def cfg(out):
        return build_config({}, [*common, "method.name=cirkd", "teacher.model=deeplabv3_resnet18",
                                 f"teacher.checkpoint={teacher}", "method.cirkd_pixel_memory=200",
                                 "method.cirkd_region_memory=20", "method.cirkd_pixel_contrast=44",
                                 "method.cirkd_region_contrast=22", "train.iters=4", "train.checkpoint_every=2",
                                 f"output.dir={out}"])

    straight = train(cfg(tmp_path / "straight"), show_progress=False)

    class StopAtTwo(HookBase):
        priority = Priority.VERY_LOW  # after the checkpoint of iteration 2

        def after_step(self, trainer):
            if trainer.state.iteration == 2:
                trainer.state.stop_signal = signal.SIGTERM

    original = Trainer.build_hooks
    monkeypatch.setattr(Trainer, "build_hooks", lambda self: original(self) + [StopAtTwo()])
    with pytest.raises(Interrupted):
        train(cfg(tmp_path / "resumed"), show_progress=False)
    monkeypatch.setattr(Trainer, "build_hooks", original)
    half = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    resumed = train(cfg(tmp_path / "resumed"), resume="required", show_progress=False)

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert half["iteration"] == 2 and a["iteration"] == b["iteration"] == 4
    queues = [k for k in a["method"] if k.startswith("cirkd.memory.")]
    assert sorted(queues) == ["cirkd.memory.pixel_ptr", "cirkd.memory.pixel_queue", "cirkd.memory.region_ptr",
                              "cirkd.memory.region_queue"]
    for k in a["method"]:  # queues, pointers, projection head: bitwise
        assert torch.equal(a["method"][k], b["method"][k]), k
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert straight.metrics == resumed.metrics
    # the queues moved between iterations 2 and 4 (restoring them is what made the runs equal)
    assert not torch.equal(half["method"]["cirkd.memory.pixel_queue"], a["method"]["cirkd.memory.pixel_queue"])
    assert half["method"]["cirkd.memory.pixel_ptr"].sum() > 0


# ----------------------------------------------------------------------------- two gloo ranks

DDP_B, DDP_K, DDP_IN, DDP_D, DDP_T, DDP_HW = 4, 3, 3, 5, 6, (3, 4)


def ddp_inputs():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(DDP_B, DDP_IN, *DDP_HW, generator=gen)  # what a shared 1x1 conv turns into student features
    teacher = torch.randn(DDP_B, DDP_T, *DDP_HW, generator=gen)
    labels = torch.randint(0, DDP_K, (DDP_B, *DDP_HW), generator=gen)  # every pixel labelled: equal counts per rank
    weight = torch.randn(DDP_D, DDP_IN, 1, 1, generator=gen)
    return z, teacher, labels, weight


def ddp_step(rows: slice, scope: str) -> dict[str, torch.Tensor]:
    """The cirkd terms of images `rows` (this rank's) and their gradients; the method built alike everywhere."""
    z, teacher, labels, weight = ddp_inputs()
    torch.manual_seed(0)
    m = build(num_classes=DDP_K, s_ch=DDP_D, t_ch=DDP_T, cirkd_pixel_memory=30, cirkd_region_memory=5,
              cirkd_pixel_contrast=12, cirkd_region_contrast=6, cirkd_batch_scope=scope)
    m.eval()  # the projection's BatchNorm on running statistics: per-rank batch statistics would differ (docstring)
    weight = weight.clone().requires_grad_(True)
    s = F.conv2d(z[rows], weight)
    torch.manual_seed(9)
    terms = m.cirkd(outputs(s), {"decoder_feature": teacher[rows]}, labels[rows])
    sum(terms.values()).backward()
    return {**{k: v.detach() for k, v in terms.items()}, "grad": weight.grad,
            **{f"proj{i}": p.grad for i, p in enumerate(m.cirkd.projection.parameters())},
            **{k: v for k, v in m.state_dict().items() if k.startswith("cirkd.memory.")}}


V2_TERMS = ("kd", "fitnet", "cirkd_batch", "cirkd_pixel", "cirkd_region", "channel_batch", "channel_memory",
            "channel_mse")


def v2_ddp_step(rows: slice) -> dict[str, torch.Tensor]:
    """`cirkdv2`'s terms of images `rows` (this rank's), their gradient and its queues, as `ddp_step` (on 8 x 8
    maps: 2 x 2 pooled positions per channel)."""
    gen = torch.Generator().manual_seed(6)
    z, teacher = torch.randn(DDP_B, DDP_IN, 8, 8, generator=gen), torch.randn(DDP_B, DDP_T, 8, 8, generator=gen)
    labels = torch.randint(0, DDP_K, (DDP_B, 8, 8), generator=gen)
    weight = torch.randn(DDP_D, DDP_IN, 1, 1, generator=gen).requires_grad_(True)
    torch.manual_seed(0)
    m = build("cirkdv2", num_classes=DDP_K, s_ch=DDP_D, t_ch=DDP_T, cirkd_pixel_memory=30, cirkd_region_memory=5,
              cirkd_pixel_contrast=12, cirkd_region_contrast=6, cirkdv2_channel_memory=40,
              cirkdv2_channel_contrast=10, cirkdv2_channel_enqueue=40)
    m.eval()
    s = F.conv2d(z[rows], weight)
    logits = torch.zeros(s.shape[0], DDP_K, 8, 8)
    torch.manual_seed(9)
    terms = m.loss_terms(outputs(s, DDP_K, logits), labels[rows], StepInfo(0, 1),
                         {"logits": logits, "decoder_feature": teacher[rows]})
    sum(terms[n] for n in V2_TERMS).backward()
    return {**{n: terms[n].detach() for n in V2_TERMS}, "grad": weight.grad,
            **{k: v for k, v in m.state_dict().items() if "memory." in k}}


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str, scope: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        per = DDP_B // world
        steps = {"": ddp_step(slice(rank * per, (rank + 1) * per), scope)}
        if scope == "global":  # cirkdv2 in the same two processes (its gathers are cirkd's)
            steps["v2"] = v2_ddp_step(slice(rank * per, (rank + 1) * per))
        for name, out in steps.items():
            for k in [k for k in out if k.startswith("cirkd_") or k == "grad" or k.startswith("proj")
                      or (name and k in V2_TERMS)]:
                dist.all_reduce(out[k])  # what DDP (gradients) and the logs (loss terms) do: the mean over ranks
                out[k] /= world
            torch.save(out, f"{out_file}{name}.{rank}")
    finally:
        dist.destroy_process_group()


def batch_loss_by_hand(s: torch.Tensor, t: torch.Tensor, tau: float, images) -> float:
    """1/|I|^2 sum_{i,j in I} 1/A sum_a KL(softmax(T_ij[a]/tau) || softmax(S_ij[a]/tau)), written out in float64."""
    def emb(x, b):
        return F.normalize(x[b].double().flatten(1), dim=0).t()
    total = 0.0
    for i in images:
        for j in images:
            s_sim, t_sim = emb(s, i) @ emb(s, j).t() / tau, emb(t, i) @ emb(t, j).t() / tau
            p, q = t_sim.softmax(1), s_sim.softmax(1)
            total += float((p * (p.log() - q.log())).sum(1).mean())
    return total / len(images) ** 2


@pytest.mark.parametrize("scope", ["global", "local"])
def test_two_gloo_ranks_against_one_process_on_the_concatenated_batch(tmp_path, scope):
    single = ddp_step(slice(0, DDP_B), scope)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out"), scope), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(2)]
    z, teacher, labels, weight = ddp_inputs()
    s = F.conv2d(z, weight)
    # the gathered relation: the mean over ranks is the loss of the whole batch, computed by hand
    by_hand = batch_loss_by_hand(s, teacher, 0.1, range(DDP_B))
    assert float(single["cirkd_batch"]) == pytest.approx(by_hand, rel=1e-5)
    if scope == "global":
        assert float(ranks[0]["cirkd_batch"]) == pytest.approx(by_hand, rel=1e-5)
    else:  # the reference's: each rank relates its own images only, a different (smaller-batch) loss
        per_rank = (batch_loss_by_hand(s, teacher, 0.1, [0, 1]) + batch_loss_by_hand(s, teacher, 0.1, [2, 3])) / 2
        assert float(ranks[0]["cirkd_batch"]) == pytest.approx(per_rank, rel=1e-5)
        assert per_rank != pytest.approx(by_hand, rel=1e-3)
    # the memory terms: every rank enqueued the gathered batch with the same draws, so the queues are the
    # single process's, bitwise, and (equal labelled counts, BatchNorm in eval mode) so are the means
    for k in ("cirkd.memory.pixel_queue", "cirkd.memory.region_queue", "cirkd.memory.pixel_ptr",
              "cirkd.memory.region_ptr"):
        assert torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], single[k]), k
    for k in ("cirkd_pixel", "cirkd_region"):
        assert float(ranks[0][k]) == pytest.approx(float(single[k]), rel=1e-5), k
    # gradients averaged over ranks (DDP) = the single process's: the gathered student keys sent theirs back
    if scope == "global":
        for k in ["grad"] + [k for k in single if k.startswith("proj")]:
            assert torch.allclose(ranks[0][k], single[k], rtol=1e-4, atol=1e-6), k
    else:
        assert not torch.allclose(ranks[0]["grad"], single["grad"], rtol=1e-3)
        return
    # cirkdv2: every rank enqueued every rank's teacher channels (and pixels) with the same draws, so its queues
    # are the single process's; the mean over ranks of each term and of the gradient is the whole batch's
    v2_single = v2_ddp_step(slice(0, DDP_B))
    v2 = [torch.load(tmp_path / f"outv2.{r}", weights_only=False) for r in range(2)]
    queues = [k for k in v2_single if "memory." in k]
    assert "channel_memory.queue" in queues and int(v2_single["channel_memory.ptr"]) == DDP_B * DDP_T
    for k in queues:
        assert torch.equal(v2[0][k], v2[1][k]) and torch.allclose(v2[0][k].float(), v2_single[k].float(), atol=1e-6), k
    for k in V2_TERMS:
        assert float(v2[0][k]) == pytest.approx(float(v2_single[k]), rel=1e-5), k
    assert torch.allclose(v2[0]["grad"], v2_single["grad"], rtol=1e-4, atol=1e-6)


def test_torchrun_two_cpu_ranks_train_cirkd_and_enqueue_both_ranks_images(tmp_path):
    torch.set_num_threads(1)
    train(build_config({}, ["model.name=deeplabv3_resnet18", "data.batch_size=2", "data.crop=32", "eval.max_images=2",
                            "output.tensorboard=false", "train.iters=1", f"output.dir={tmp_path / 'teacher'}"]),
          show_progress=False)
    env = {**cli_env(), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sdesbench",
           "train", "--method", "cirkd", "--iters", "2", "--device", "cpu", "--set", "data.batch_size=2",
           "--set", "data.crop=32", "--set", "eval.max_images=2", "--set", "teacher.model=deeplabv3_resnet18",
           "--set", f"teacher.checkpoint={tmp_path / 'teacher' / 'checkpoints' / 'last.pt'}",
           "--set", "method.cirkd_pixel_memory=200", "--set", "method.cirkd_region_memory=20",
           "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = read_json(out / "results.json")
    assert rec["status"] == "completed" and rec["world_size"] == 2
    assert '"cirkd_batch"' in (out / "log.jsonl").read_text()
    # a 32 x 32 crop is a 4 x 4 teacher feature: one rank's 2 images x 2 iterations enqueue at most 64 pixels
    # (16 per image); rank 0's queues hold more, so they took rank 1's images too (the gathered enqueue)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert int(state["method"]["cirkd.memory.pixel_ptr"].sum()) > 2 * 2 * 16
