"""Self-KD baselines (lsr, tfkd, tfkd-self, sad, srss, tffd): each loss against a hand-computed
value, its zero/minimum where one exists, SAD's warm-up, option validation, and a short CLI run."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, read_json, run_cli
from sdesbench.engine.configure import build_config
from sdesbench.io import save_checkpoint
from sdesbench.engine.trainer import train
from sdesbench.errors import CheckpointError, ConfigError
from sdesbench.methods.base import MethodContext, StepInfo
from sdesbench.methods.lsr import label_smoothed_ce
from sdesbench.methods.losses import pixel_ce
from sdesbench.methods.student import Student
from sdesbench.methods.sad import attention_map, sad_loss, sad_pair_loss, spatial_softmax
from sdesbench.methods.srss import class_presence, sr_feature_loss, sr_logit_loss, sr_presence_loss
from sdesbench.methods.tffd import channel_saliency, inter_layer_loss, intra_layer_loss, stage_pairs
from sdesbench.methods.losses import hinton_kd_loss
from sdesbench.methods.tfkd import tfkd_reg_loss, virtual_teacher
from sdesbench.models import build_model
from sdesbench.methods import METHODS
from sdesbench.models import MODELS

LN2, LN3 = math.log(2), math.log(3)


def pixels(*rows):
    """Logits for one image, one row of pixels: pixels([l0...], [l0...]) -> 1 x C x 1 x P."""
    return torch.tensor(rows, dtype=torch.float32).T.reshape(1, len(rows[0]), 1, len(rows))


def ctx(stage_channels=(4, 8), num_classes=3, total_iters=10):
    model = SimpleNamespace(stage_channels=list(stage_channels))
    return MethodContext(model=model, num_classes=num_classes, total_iters=total_iters, class_pixel_counts=lambda: None)


def build(name, options=None, **kw):
    cls = METHODS.get(name)
    return cls(cls.parse_options(options or {}, kw.get("num_classes", 3)), ctx(**kw))


# ----------------------------------------------------------------------------- lsr


def test_label_smoothing_by_hand():
    # pixel 1: p = [1/4, 1/2, 1/4], label 0: -log p = [2ln2, ln2, 2ln2], sum = 5 ln2
    #   all:    0.9 * 2ln2 + 0.1 * 5ln2/3       = (1.8 + 1/6) ln2
    #   others: 0.9 * 2ln2 + 0.1 * (5ln2-2ln2)/2 = 1.95 ln2
    # pixel 2: uniform logits, label 2: ln3 under both forms; pixel 3 is ignored (255)
    logits = pixels([0.0, LN2, 0.0], [0.0, 0.0, 0.0], [9.0, -9.0, 3.0])
    labels = torch.tensor([[[0, 2, 255]]])
    assert label_smoothed_ce(logits, labels, 0.1, "all").item() == pytest.approx(((1.8 + 1 / 6) * LN2 + LN3) / 2)
    assert label_smoothed_ce(logits, labels, 0.1, "others").item() == pytest.approx((1.95 * LN2 + LN3) / 2)
    # "all" is torch's label_smoothing (uniform over the C classes including the true one)
    ref = F.cross_entropy(logits, labels, ignore_index=255, label_smoothing=0.1)
    assert label_smoothed_ce(logits, labels, 0.1, "all").item() == pytest.approx(ref.item(), rel=1e-6)


def test_label_smoothing_with_zero_epsilon_is_cross_entropy_and_all_ignored_is_zero():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 3, 4), torch.randint(0, 5, (2, 3, 4))
    labels[0, 0] = 255
    for spread in ("all", "others"):
        assert label_smoothed_ce(logits, labels, 0.0, spread).item() == pytest.approx(pixel_ce(logits, labels).item())
    assert label_smoothed_ce(logits, torch.full_like(labels, 255), 0.1).item() == 0.0


# ----------------------------------------------------------------------------- tfkd


def test_virtual_teacher_by_hand():
    p = virtual_teacher(torch.tensor([[[2, 255]]]), 3, 0.8)
    assert p[0, :, 0, 0].tolist() == pytest.approx([0.1, 0.1, 0.8])  # a on the label, (1-a)/(C-1) elsewhere
    assert p.sum(1).flatten().tolist() == pytest.approx([1.0, 1.0])


def test_kd_term_used_by_tfkd_and_srss_by_hand():
    # teacher probabilities [3/4, 1/4], student logits 0 (q = [1/2, 1/2]):
    # T = 1: KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    # T = 2: teacher softmax(log p / 2) = [sqrt(3/4), sqrt(1/4)] / (sqrt(3/4) + sqrt(1/4)); times T^2 = 4
    teacher = pixels([math.log(0.75), math.log(0.25)])
    student = pixels([0.0, 0.0])
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    assert hinton_kd_loss(student, teacher, 1.0, valid).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    z = math.sqrt(0.75) + 0.5
    t2 = [math.sqrt(0.75) / z, 0.5 / z]
    expected = 4 * sum(p * math.log(p / 0.5) for p in t2)
    assert hinton_kd_loss(student, teacher, 2.0, valid).item() == pytest.approx(expected, rel=1e-6)
    assert hinton_kd_loss(student, student, 3.0, valid).item() == pytest.approx(0.0, abs=1e-7)


def test_tfkd_reg_by_hand_and_zero_at_the_virtual_teacher():
    labels = torch.tensor([[[0, 255]]])
    student = pixels([0.0, 0.0], [5.0, -5.0])  # the ignored second pixel must not count
    # log softening, a = 3/4, T = 2: the softened virtual teacher of the previous test, times 4
    z = math.sqrt(0.75) + 0.5
    expected = 4 * sum(p * math.log(p / 0.5) for p in (math.sqrt(0.75) / z, 0.5 / z))
    assert tfkd_reg_loss(student, labels, 0.75, 2.0, "log").item() == pytest.approx(expected, rel=1e-6)
    # prob softening (public code): teacher softmax([3/4, 1/4] / 1) = [s, 1-s], s = sigmoid(1/2); student at T=1
    s = 1 / (1 + math.exp(-0.5))
    expected_prob = s * math.log(s / 0.5) + (1 - s) * math.log((1 - s) / 0.5)
    assert tfkd_reg_loss(student, labels, 0.75, 1.0, "prob").item() == pytest.approx(expected_prob, rel=1e-6)
    # a student whose logits are log p^d already matches the virtual teacher at every T
    matched = pixels([math.log(0.75), math.log(0.25)], [0.0, 0.0])
    for t in (1.0, 4.0, 20.0):
        assert tfkd_reg_loss(matched, labels, 0.75, t, "log").item() == pytest.approx(0.0, abs=1e-6)


def test_tfkd_method_weights_ce_by_one_minus_alpha():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    m = build("tfkd", {"alpha": 0.25, "temperature": 4.0})
    terms = m.loss_terms({"logits": logits, "aux": None}, labels, StepInfo(0, 10))
    assert terms["ss"].item() == pytest.approx(0.75 * pixel_ce(logits, labels).item())
    assert terms["tfkd"].item() == pytest.approx(0.25 * tfkd_reg_loss(logits, labels, 0.99, 4.0).item())


def test_tfkd_self_refuses_a_teacher_of_another_architecture():
    a, b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 8, 1)
    a.stage_channels, b.stage_channels = [4], [8]
    cls = METHODS.get("tfkd-self")
    assert cls.needs_teacher
    opts = cls.parse_options({}, 3)
    with pytest.raises(ConfigError, match="trained copy of the student"):
        cls(opts, MethodContext(model=a, num_classes=3, total_iters=1, class_pixel_counts=lambda: None, teacher=b))


# ----------------------------------------------------------------------------- sad


def test_attention_map_and_spatial_softmax_by_hand():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # 1 x 2 channels x 1 x 2
    assert attention_map(f).flatten().tolist() == [1 + 9, 4 + 0]
    assert spatial_softmax(torch.tensor([[[[0.0, LN3]]]])).flatten().tolist() == pytest.approx([0.25, 0.75])


def test_sad_pair_by_hand_with_resize():
    # shallow 1x1x1x2 with values [0, sqrt(ln3)] -> G = [0, ln3] -> softmax [1/4, 3/4]
    # deep 1x1x1x1 -> resized to 1x2 (constant) -> softmax [1/2, 1/2]
    # MSE mean = ((1/4)^2 + (1/4)^2) / 2 = 1/16; sum over positions = 1/8
    shallow = torch.tensor([[[[0.0, math.sqrt(LN3)]]]], requires_grad=True)
    deep = torch.tensor([[[[7.0]]]], requires_grad=True)
    loss = sad_pair_loss(shallow, deep)
    assert loss.item() == pytest.approx(1 / 16)
    assert sad_pair_loss(shallow, deep, reduction="sum").item() == pytest.approx(1 / 8)
    loss.backward()
    assert shallow.grad is not None and deep.grad is None  # the deeper map is a detached target


def test_sad_is_zero_for_identical_consecutive_attention():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 5)
    same_attention = x[:, [3, 2, 1, 0]]  # other channel order, same sum of squares
    assert sad_loss([x, same_attention, x]).item() == pytest.approx(0.0, abs=1e-12)
    assert sad_loss([x, torch.randn(2, 8, 3, 3)]).item() > 0


def test_sad_warm_up():
    torch.manual_seed(0)
    stages = [torch.randn(2, 4, 6, 6), torch.randn(2, 8, 3, 3)]
    out = {"logits": torch.randn(2, 3, 6, 6), "aux": None, "stages": stages}
    labels = torch.randint(0, 3, (2, 6, 6))
    m = build("sad", {"warmup_fraction": 0.5, "weight": 0.1}, stage_channels=(4, 8))
    expected = 0.1 * sad_loss(stages).item()
    assert expected > 0
    assert m.loss_terms(out, labels, StepInfo(4, 10))["sad"].item() == 0.0  # 4 < 0.5 * 10
    assert m.loss_terms(out, labels, StepInfo(5, 10))["sad"].item() == pytest.approx(expected)
    assert m.loss_terms(out, labels, StepInfo(9, 10))["sad"].item() == pytest.approx(expected)
    m0 = build("sad", {"warmup_fraction": 0.0}, stage_channels=(4, 8))
    assert m0.loss_terms(out, labels, StepInfo(0, 10))["sad"].item() == pytest.approx(expected)


# ----------------------------------------------------------------------------- tffd


def test_channel_saliency_and_intra_layer_by_hand():
    # channels (1 x 2 positions): [1,1] -> 0.7071, [1,0] -> 0.5, [3,4] -> 0.7, [1,2] -> 0.6708 (mean of the
    # L2-normalised map). Ranking 0, 2, 3, 1: top half (0, 2) teaches bottom half (3, 1) pairwise:
    # ([1,2]-[1,1])^2 + ([1,0]-[3,4])^2 = [0,1] + [4,16] -> mean over 4 elements = 21 / 4
    f = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [3.0, 4.0], [1.0, 2.0]]]).reshape(1, 4, 1, 2)
    assert channel_saliency(f).tolist() == pytest.approx([math.sqrt(0.5), 0.5, 0.7, 3 / math.sqrt(5) / 2])
    assert intra_layer_loss(f).item() == pytest.approx(21 / 4)
    # odd C: the middle-ranked channel is left out; [1,0] learns from [1,1] -> (0 + 1) / 2
    assert intra_layer_loss(f[:, :3]).item() == pytest.approx(0.5)  # channels 0 (top), 2 (middle), 1 (bottom)


def test_intra_layer_is_zero_when_halves_are_equal():
    g = torch.randn(2, 1, 3, 3).abs()
    assert intra_layer_loss(g.repeat(1, 4, 1, 1)).item() == pytest.approx(0.0, abs=1e-12)


def test_inter_layer_by_hand():
    # shallow 2 channels at 2x2 (means 2.5 and 0) vs deep 4 channels at 1x1 ([1,3,5,7])
    shallow = torch.cat([torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)], 1)
    deep = torch.tensor([1.0, 3.0, 5.0, 7.0]).reshape(1, 4, 1, 1).requires_grad_()
    # pool: deep channel pairs averaged -> [2, 6]; ((2.5-2)^2 + (0-6)^2) / 2 = 18.125
    loss = inter_layer_loss(shallow.requires_grad_(), deep, "pool")
    assert loss.item() == pytest.approx(18.125)
    # truncate (public code): first 2 deep channels [1, 3]; ((2.5-1)^2 + 3^2) / 2 = 5.625
    assert inter_layer_loss(shallow, deep, "truncate").item() == pytest.approx(5.625)
    loss.backward()
    assert deep.grad is None and shallow.grad is not None
    # non-square maps: shallow 2x4 and deep 4x2 are both pooled to 2x2
    s = torch.arange(8.0).reshape(1, 1, 2, 4)  # -> [[0.5, 2.5], [4.5, 6.5]]
    assert inter_layer_loss(s, torch.zeros(1, 1, 4, 2)).item() == pytest.approx((0.25 + 6.25 + 20.25 + 42.25) / 4)
    # the deeper feature taught to itself: zero
    assert inter_layer_loss(s, s.clone()).item() == 0.0


def test_tffd_pairs_ramp_and_adapter():
    assert stage_pairs(3, "all") == [(0, 1), (0, 2), (1, 2)]
    assert stage_pairs(3, "consecutive") == [(0, 1), (1, 2)]
    m = build("tffd", {"channel_match": "adapter", "warmup_fraction": 0.5}, stage_channels=(4, 8, 8), total_iters=10)
    assert len(m.adapters) == 3 and m.ramp(StepInfo(1, 10)) == pytest.approx(0.4) and m.ramp(StepInfo(7, 10)) == 1.0
    stages = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)]
    terms = m.loss_terms({"logits": torch.randn(2, 3, 8, 8), "aux": None, "stages": stages},
                         torch.randint(0, 3, (2, 8, 8)), StepInfo(9, 10))
    sum(terms.values()).backward()
    assert all(a.weight.grad is not None for a in m.adapters)


# ----------------------------------------------------------------------------- srss


def test_class_presence_by_hand():
    labels = torch.tensor([[[0, 2], [255, 2]], [[3, 3], [3, 255]]])
    assert class_presence(labels, 4).tolist() == [[1, 0, 1, 0], [0, 0, 0, 1]]


def test_sr_feature_by_hand():
    # shallow arg-max: pixel 1 -> class 0, pixel 2 -> class 1 (hard pseudo-labels)
    # deeper logits: pixel 1 uniform -> CE ln2; pixel 2 [ln3, 0] -> p(class 1) = 1/4 -> CE ln4
    shallow = pixels([5.0, 0.0], [0.0, 5.0])
    deeper = pixels([0.0, 0.0], [LN3, 0.0])
    assert sr_feature_loss(shallow, [deeper], torch.tensor([[[1, 0]]])).item() == pytest.approx((LN2 + 2 * LN2) / 2)
    assert sr_feature_loss(shallow, [deeper, deeper], torch.tensor([[[1, 255]]])).item() == pytest.approx(2 * LN2)


def test_sr_logit_and_presence_by_hand():
    labels = torch.tensor([[[0, 1]]])
    deep = pixels([math.log(0.75), math.log(0.25)], [0.0, 0.0])
    shallow = pixels([0.0, 0.0], [0.0, 0.0])
    # pixel 1: KL([3/4,1/4] || [1/2,1/2]); pixel 2: 0; mean over the 2 pixels; two identical exits add up
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert sr_logit_loss(deep, [shallow, shallow], labels).item() == pytest.approx(2 * kl / 2)
    assert sr_logit_loss(deep, [deep.clone()], labels).item() == pytest.approx(0.0, abs=1e-7)
    # presence form: deep logit 0 -> target 1/2; shallow logit 0 -> BCE = ln2 per class
    assert sr_presence_loss(torch.zeros(1, 3), [torch.zeros(1, 3)]).item() == pytest.approx(LN2)


def test_srss_exits_train_and_stay_out_of_the_student():
    model = build_model("deeplabv3_resnet18", 3)
    cls = METHODS.get("srss")
    m = cls(cls.parse_options({"exit_channels": 8}, 3),
            MethodContext(model=model, num_classes=3, total_iters=4, class_pixel_counts=lambda: None))
    assert len(m.exits) == len(model.stage_channels) - 1
    assert not any(k.startswith("exits") for k in model.state_dict())
    torch.manual_seed(0)
    out = model(torch.randn(2, 3, 32, 32))
    terms = m.loss_terms(out, torch.randint(0, 3, (2, 32, 32)), StepInfo(0, 4))
    assert set(terms) == {"ss", "exit_ce", "presence", "sr_f", "sr_l"}
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in m.parameters())


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("name,key,value,needle", [
    ("lsr", "epsilon", 1.5, "method.epsilon=1.5 is out of range"),
    ("lsr", "spread", "some", "method.spread must be one of"),
    ("tfkd", "alpha", -0.1, "method.alpha=-0.1 is out of range"),
    ("tfkd", "correct_prob", 0.05, "must exceed 1/C"),
    ("tfkd", "softening", "exp", "method.softening must be one of"),
    ("tfkd-self", "temperature", 0, "method.temperature=0.0 is out of range"),
    ("tfkd-self", "class_reduction", "max", "method.class_reduction must be one of"),
    ("tfkd-self", "multiplier", -1, "method.multiplier=-1.0 is out of range"),
    ("sad", "warmup_fraction", 1.5, "method.warmup_fraction=1.5 is out of range"),
    ("sad", "reduction", "max", "method.reduction must be one of"),
    ("srss", "srl_form", "kl", "method.srl_form must be one of"),
    ("srss", "srf_weight", -1, "method.srf_weight=-1.0 is out of range"),
    ("tffd", "channel_match", "conv", "method.channel_match must be one of"),
    ("tffd", "pairing", "some", "method.pairing must be one of"),
    ("tffd", "intra_detach_salient", "maybe", "method.intra_detach_salient"),
])
def test_bad_option_is_one_config_error_line(name, key, value, needle):
    with pytest.raises(ConfigError) as e:
        build_config({}, [f"method.name={name}", f"method.{key}={value}"])
    assert needle in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- end to end

MODEL_NAMES = ["deeplabv3_resnet18"] + (["enet"] if "enet" in MODELS else [])


# the self-KD methods that train without a teacher run (tfkd-self's teacher is a trained copy of the student)
SELF_KD = [n for n in METHODS.names() if issubclass(METHODS.get(n), Student) and METHODS.get(n) is not Student
           and not METHODS.get(n).needs_teacher]


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("name", SELF_KD)
def test_method_trains_through_cli(tmp_path, name, model):
    proc = run_cli("train", "--method", name, "--model", model, "--iters", "2", *FAST, "--set", "eval.max_images=2",
                   "--set", "data.check=false", "--set", "data.batch_size=2", "--set", "data.crop=32",
                   "--out", str(tmp_path / name))
    assert proc.returncode == 0, proc.stderr
    rec = read_json(tmp_path / name / "results.json")
    assert rec["status"] == "completed" and rec["method"] == name
    assert rec["params"] == sum(p.numel() for p in build_model(model, rec["num_classes"]).parameters())


def test_tfkd_self_trains_from_a_student_checkpoint(tmp_path):
    # in-process (the CLI path is the same Trainer; one interpreter start less keeps the suite fast)
    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pt"
    save_checkpoint(ckpt, {"model_name": "deeplabv3_resnet18", "num_classes": 11,
                           "model": build_model("deeplabv3_resnet18", 11).state_dict()})
    cfg = build_config({}, ["method.name=tfkd-self", "train.iters=2", "data.batch_size=2", "data.crop=32",
                            "data.check=false", "eval.max_images=1", "teacher.model=deeplabv3_resnet18",
                            f"teacher.checkpoint={ckpt}", f"output.dir={tmp_path / 'run'}"])
    rec = train(cfg, show_progress=False).to_dict()
    assert rec["status"] == "completed" and rec["method"] == "tfkd-self"
    bad = build_config({}, ["method.name=tfkd-self", "train.iters=1", "data.check=false", "teacher.model=deeplabv3_resnet50",
                            f"teacher.checkpoint={ckpt}", f"output.dir={tmp_path / 'bad'}"])
    with pytest.raises(CheckpointError):  # the checkpoint is a resnet18, the spec names a resnet50
        train(bad, show_progress=False)
