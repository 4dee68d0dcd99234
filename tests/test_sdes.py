"""SDES (Eqs. 2-12): each pure function against a hand computation, the gradient paths, option
validation, and short `sdesbench train` runs of `sdes` and its ablation variants."""
import math

import pytest
import torch

from conftest import CAMVID, FAST, assert_one_line_error, read_json, run_cli
from sdesbench.engine.configure import build_config
from sdesbench.engine.trainer import train
from sdesbench.errors import ConfigError
from sdesbench.methods.base import MethodContext, StepInfo
from sdesbench.models.experts import LightExpertDecoder
from sdesbench.methods.sdes import (SDES, bilinear_upsample, class_groups, dfed_loss, dped_loss, ensemble_logits,
                                    expert_ce_loss, subset_to_full_logits)
from sdesbench.models import build_model, count_params
from sdesbench.data import DATASETS
from sdesbench.methods import METHODS

# ----------------------------------------------------------------------------- Eq. 2: class groups


def test_class_groups_more_to_less_equal_chunks():
    # ranked by count: class 0 (50), 2 (30), 1 (10), 3 (5), 4 (5; tie -> lower index first)
    assert class_groups([50, 10, 30, 5, 5], 2) == [[0, 2, 1], [3, 4]]
    assert class_groups([50, 10, 30, 5, 5], 3) == [[0, 2], [1, 3], [4]]
    assert class_groups(torch.tensor([50, 10, 30, 5, 5]), 5) == [[0], [2], [1], [3], [4]]
    assert class_groups([50, 10, 30, 5, 5], 1) == [[0, 2, 1, 3, 4]]


def test_class_groups_natural_cut_minimises_log_spread():
    counts = [50, 10, 30, 5, 5]
    logs = [math.log1p(c) for c in (50, 30, 10, 5, 5)]  # the ranked list

    def sse(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs)

    costs = {cut: sse(logs[:cut]) + sse(logs[cut:]) for cut in (1, 2, 3, 4)}
    assert min(costs, key=costs.get) == 2  # {50, 30} | {10, 5, 5}
    assert class_groups(counts, 2, sizes="natural") == [[0, 2], [1, 3, 4]]


def test_class_groups_random_is_a_seeded_partition_with_the_same_sizes():
    counts = [50, 10, 30, 5, 5, 7, 90, 1]
    ranked = class_groups(counts, 3)
    a = class_groups(counts, 3, mode="random", seed=3)
    assert a == class_groups(counts, 3, mode="random", seed=3)
    assert [len(g) for g in a] == [len(g) for g in ranked] == [3, 3, 2]
    assert sorted(c for g in a for c in g) == list(range(8))
    draws = [class_groups(counts, 3, mode="random", seed=s) for s in range(6)]
    assert any(d != ranked for d in draws) and len({str(d) for d in draws}) > 1


def test_class_groups_voc_background_alone():
    counts = [1000] + list(range(1, 21))  # foreground class c has c pixels: ranked 20, 19, ..., 1
    groups = class_groups(counts, 5, isolate=[0])
    assert groups == [[0], [20, 19, 18, 17, 16], [15, 14, 13, 12, 11], [10, 9, 8, 7, 6], [5, 4, 3, 2, 1]]


@pytest.mark.parametrize("n,isolate", [(6, ()), (0, ()), (1, [0]), (2, [7])])
def test_class_groups_rejects_impossible_splits(n, isolate):
    with pytest.raises(ConfigError):
        class_groups([5, 4, 3, 2, 1], n, isolate=isolate)


# ----------------------------------------------------------------------------- Eqs. 3-5: DPED


def test_expert_ce_loss_by_hand():
    groups = [[0], [1, 2]]
    labels = torch.tensor([[[0, 2, 255]]])  # B=1, H=1, W=3
    e0 = torch.tensor([[2.0, 0.0, 1.0], [5.0, 5.0, 5.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    e1 = torch.tensor([[9.0, 9.0, 9.0], [0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(1)))  # pixel 0, class 0
    ce1 = -math.log(math.exp(3) / (1 + math.exp(1) + math.exp(3)))  # pixel 1, class 2
    got = expert_ce_loss([e0, e1], groups, labels)
    assert abs(got.item() - (ce0 + ce1) / 2) < 1e-6
    # subset 1 absent from the batch: its expert adds 0, the sum is still divided by N = 2
    got = expert_ce_loss([e0, e1], groups, torch.tensor([[[0, 0, 255]]]))
    ce0b = -math.log(math.exp(5) / (3 * math.exp(5)))  # pixel 1 is now class 0, expert 0 logits (5, 5, 5)
    assert abs(got.item() - (ce0 + ce0b) / 2 / 2) < 1e-6
    # subset logits: expert 0 has one logit (CE 0), expert 1 two (classes 1, 2): label 2 -> index 1
    s0 = torch.zeros(1, 1, 1, 3)
    s1 = torch.tensor([[9.0, 9.0], [1.0, 3.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 3)
    got = expert_ce_loss([s0, s1], groups, labels, expert_classes="subset")
    assert abs(got.item() - (0 + -math.log(math.exp(3) / (math.exp(1) + math.exp(3)))) / 2) < 1e-6


def test_routed_expert_ce_equals_separate_masked_ces_with_gradients():
    torch.manual_seed(1)
    groups = [[0, 3], [1], [2, 4]]
    labels = torch.randint(0, 5, (2, 6, 6))
    labels[0, 0] = 255
    labels[labels == 1] = 0  # subset [1] absent: its expert adds 0
    experts = [torch.randn(2, 5, 6, 6, requires_grad=True) for _ in groups]
    routed = expert_ce_loss(experts, groups, labels)
    g_routed = torch.autograd.grad(routed, experts)
    separate = 0
    for e, g in zip(experts, groups):  # Eq. 3 written out: CE over M^n, mean over |M^n|, then 1/N
        mask = torch.isin(labels, torch.tensor(g))
        if mask.any():
            separate = separate + torch.nn.functional.cross_entropy(e.permute(0, 2, 3, 1)[mask], labels[mask])
    separate = separate / 3
    g_sep = torch.autograd.grad(separate, experts, allow_unused=True)
    assert routed.item() == pytest.approx(separate.item(), abs=1e-6)
    for a, b in zip(g_routed, g_sep):
        assert torch.allclose(a, torch.zeros_like(a) if b is None else b, atol=1e-7)


def test_subset_to_full_logits_keeps_the_students_subset_mass():
    student = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    full = subset_to_full_logits(torch.zeros(1, 2, 1, 1), student, [1, 2]).flatten().tolist()
    lse = math.log(math.exp(2) + math.exp(3))
    assert full[0] == pytest.approx(1.0)
    assert full[1] == pytest.approx(lse - math.log(2)) and full[2] == pytest.approx(lse - math.log(2))


def test_ensemble_logits_fills_each_pixel_from_its_expert():
    torch.manual_seed(0)
    groups = [[0], [1, 2]]
    labels = torch.tensor([[[0, 1], [2, 255]]])  # 2x2 image
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    e0, e1 = torch.randn(1, 3, 2, 2, requires_grad=True), torch.randn(1, 3, 2, 2, requires_grad=True)
    out = ensemble_logits(student, [e0, e1], groups, labels)
    assert not out.requires_grad
    assert torch.equal(out[0, :, 0, 0], e0[0, :, 0, 0].detach())  # label 0 -> expert 0
    assert torch.equal(out[0, :, 0, 1], e1[0, :, 0, 1].detach())  # label 1 -> expert 1
    assert torch.equal(out[0, :, 1, 0], e1[0, :, 1, 0].detach())  # label 2 -> expert 1
    assert torch.equal(out[0, :, 1, 1], student[0, :, 1, 1].detach())  # ignored -> student


@pytest.mark.parametrize("shape,size", [((2, 3, 16, 16), (128, 128)), ((1, 2, 5, 7), (37, 50)), ((1, 1, 8, 8), (4, 4))])
def test_matmul_bilinear_upsample_equals_interpolate(shape, size):
    x = torch.randn(*shape, requires_grad=True)
    ref = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    got = bilinear_upsample(x, size)
    g = torch.randn_like(ref)
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(ref, x, g)[0], atol=1e-4)


def _softmax(xs):
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


def test_dped_loss_two_pixels_by_hand():
    tau = 2.0
    student = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 2)  # rows are pixels: logits (1,0), (0,0)
    target = torch.tensor([[0.0, 1.0], [2.0, 0.0]]).T.reshape(1, 2, 1, 2)  # pixel logits (0,1), (2,0)
    p = [_softmax([0.5, 0.0]), _softmax([0.0, 0.0])]
    q = [_softmax([0.0, 0.5]), _softmax([1.0, 0.0])]
    kl_sq = [sum(pi[j] * math.log(pi[j] / qi[j]) for j in range(2)) for pi, qi in zip(p, q)]
    kl_qs = [sum(qi[j] * math.log(qi[j] / pi[j]) for j in range(2)) for pi, qi in zip(p, q)]
    assert dped_loss(student, target, tau).item() == pytest.approx(sum(kl_sq) / 2, abs=1e-6)
    assert dped_loss(student, target, tau, "teacher_first").item() == pytest.approx(sum(kl_qs) / 2, abs=1e-6)
    assert sum(kl_sq) != pytest.approx(sum(kl_qs))  # the two directions really differ here


# ----------------------------------------------------------------------------- Eqs. 6-11: DFED


def _stages():
    # stage 1: C=2, 2x4. |F| sums (Eq. 6): ch0 = 2, ch1 = 1+3+3+1+3+1 = 12 -> ch1 kept (gamma .5 -> k=1)
    s1 = torch.tensor([[[2.0, 0, 0, 0], [0, 0, 0, 0]],
                       [[1.0, 0, 3, 3], [1, 0, 3, 1]]]).unsqueeze(0)
    # stage 2: C=3, 1x2. p=1 sums: ch0 3, ch1 2.5, ch2 1 -> ch0; p=2 sums: 5, 6.25, 1 -> ch1
    s2 = torch.tensor([[[1.0, 2.0]], [[-2.5, 0.0]], [[0.0, 1.0]]]).unsqueeze(0)
    # last stage (student side, all channels): C=2, 1x2
    s3 = torch.tensor([[[1.0, 1.0]], [[1.0, 3.0]]]).unsqueeze(0)
    return [s1, s2, s3]


def _unit(xs):
    n = math.sqrt(sum(x * x for x in xs))
    return [x / n for x in xs]


def test_dfed_loss_by_hand():
    a1 = _unit([0.5 ** 2, 2.5 ** 2])  # ch1 2x2-average-pooled to (0.5, 2.5), squared (AT, 1 channel)
    a2 = _unit([1.0, 4.0])  # ch0 (1, 2) squared
    expert = [max(a, b) for a, b in zip(a1, a2)]  # Eq. 10
    student = _unit([(1 + 1) / 2, (1 + 9) / 2])  # mean over channels of squares: (1, 5)
    diff = [s - e for s, e in zip(student, expert)]
    l2 = math.sqrt(sum(d * d for d in diff))
    assert dfed_loss(_stages(), gamma=0.5, distance="l2").item() == pytest.approx(l2, abs=1e-6)
    # the default: attention transfer's mean over images and positions of the squared difference
    assert dfed_loss(_stages(), 0.5).item() == pytest.approx(sum(d * d for d in diff) / 2, abs=1e-6)
    # gamma = 0 keeps the single top channel: here the same as gamma = 0.5
    assert dfed_loss(_stages(), gamma=0.0, distance="l2").item() == pytest.approx(l2, abs=1e-6)
    # batch reduction: mean over images of the per-image norm (image 2 = image 1 -> same value)
    two = [torch.cat([s, s]) for s in _stages()]
    assert dfed_loss(two, 0.5, distance="l2").item() == pytest.approx(l2, abs=1e-6)
    assert dfed_loss(two, 0.5).item() == pytest.approx(sum(d * d for d in diff) / 2, abs=1e-6)


def test_dfed_loss_p2_gamma1_and_mean_abs_by_hand():
    student = _unit([1.0, 5.0])
    # p = 2 keeps stage-2 ch1 (-2.5, 0) -> squared (6.25, 0) -> (1, 0)
    expert = [max(a, b) for a, b in zip(_unit([0.25, 6.25]), [1.0, 0.0])]
    want = math.sqrt(sum((s - e) ** 2 for s, e in zip(student, expert)))
    assert dfed_loss(_stages(), 0.5, p=2, distance="l2").item() == pytest.approx(want, abs=1e-6)
    # gamma = 1 keeps all channels: stage 1 pooled ch0 (0.5, 0), ch1 (0.5, 2.5); stage 2 all three
    a1 = _unit([(0.25 + 0.25) / 2, (0 + 6.25) / 2])
    a2 = _unit([(1 + 6.25 + 0) / 3, (4 + 0 + 1) / 3])
    expert = [max(a, b) for a, b in zip(a1, a2)]
    want = math.sqrt(sum((s - e) ** 2 for s, e in zip(student, expert)))
    assert dfed_loss(_stages(), 1.0, distance="l2").item() == pytest.approx(want, abs=1e-6)
    # mean_abs attention: stage 1 (0.5, 2.5), stage 2 ch0 (1, 2), last ((1+1)/2, (1+3)/2)
    expert = [max(a, b) for a, b in zip(_unit([0.5, 2.5]), _unit([1.0, 2.0]))]
    want = math.sqrt(sum((s - e) ** 2 for s, e in zip(_unit([1.0, 2.0]), expert)))
    assert dfed_loss(_stages(), 0.5, attention="mean_abs", distance="l2").item() == pytest.approx(want, abs=1e-6)


def test_dfed_gradient_reaches_only_the_last_stage():
    stages = [s.clone().requires_grad_(True) for s in _stages()]
    dfed_loss(stages, 0.5).backward()
    assert stages[0].grad is None and stages[1].grad is None
    assert stages[2].grad is not None and stages[2].grad.abs().sum() > 0


# ----------------------------------------------------------------------------- method: gradient paths


def _method(name="sdes", **options):
    model = build_model("deeplabv3_resnet18", 5)
    n_before = count_params(model)
    cls = METHODS.get(name)
    opts = cls.parse_options({"n_experts": 2, **options}, num_classes=5)
    ctx = MethodContext(model=model, num_classes=5, total_iters=1,
                        class_pixel_counts=lambda: torch.tensor([40, 30, 20, 10, 5]))
    return model, cls(opts, ctx), n_before


def _batch():
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[:, :4] = 255
    return torch.randn(2, 3, 32, 32), labels


@pytest.mark.parametrize("expert", ["light", "student"])
def test_gradient_paths_and_deployed_parameter_count(expert):
    model, method, n_before = _method(expert=expert)
    assert method.groups == [[0, 1, 2], [3, 4]]
    assert count_params(model) == n_before  # the experts live in the method, not the model
    assert not any("expert" in k for k in model.state_dict())
    images, labels = _batch()
    out = model(images)
    terms = method.loss_terms(out, labels, StepInfo(0, 1))
    assert set(terms) == {"ss", "ss_experts", "dped", "dfed"}
    enc, dec, experts = list(model.backbone.parameters()), list(model.decoder.parameters()), list(method.parameters())

    def grads(term, params):
        return torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)

    # expert losses (Eq. 3) train the experts and never reach the encoder or the student decoder
    assert all(g is None for g in grads(terms["ss_experts"], enc + dec))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(terms["ss_experts"], experts))
    # DPED (Eq. 5) trains the student; its target (Eq. 4) carries no gradient to the experts
    assert all(g is None for g in grads(terms["dped"], experts))
    assert sum(g.abs().sum() for g in grads(terms["dped"], dec)) > 0
    assert not method._ensemble(out["logits"], method._expert_logits(out), labels).requires_grad
    # DFED (Eq. 11) reaches the encoder, not the decoder
    assert all(g is None for g in grads(terms["dfed"], dec))
    assert sum(g.abs().sum() for g in grads(terms["dfed"], enc) if g is not None) > 0
    # Ens-T: one prediction at input size
    method.eval()
    with torch.no_grad():
        ens = method.eval_predictions(model(images), labels)
    assert set(ens) == {"ens_t"} and ens["ens_t"].shape == (2, 5, 32, 32)


def test_default_forms_are_tau_squared_and_squared_mean():
    """alpha tau^2 L_DPED and beta mean((A_L - A^T)^2) by default; the printed forms stay options."""
    model, method, _ = _method(tau=5.0)
    _, printed, _ = _method(tau=5.0, tau_squared=False, dfed_distance="l2")
    printed.load_state_dict(method.state_dict())
    images, labels = _batch()
    model.eval()  # no dropout: both methods see the same student output
    out = model(images)
    terms, terms_printed = method.loss_terms(out, labels, StepInfo(0, 1)), printed.loss_terms(out, labels, StepInfo(0, 1))
    assert terms["dped"].item() == pytest.approx(25 * terms_printed["dped"].item(), rel=1e-6)
    assert terms["dfed"].item() == pytest.approx(100 * dfed_loss(out["stages"], 0.5, distance="squared_mean").item(),
                                                 rel=1e-6)
    assert terms_printed["dfed"].item() == pytest.approx(100 * dfed_loss(out["stages"], 0.5, distance="l2").item(),
                                                         rel=1e-6)


def test_subset_experts_and_variants_build_what_they_should():
    _, method, _ = _method(expert_classes="subset")
    assert [e.classifier.out_channels for e in method.experts] == [3, 2]
    _, no_dped, _ = _method("sdes-no-dped")
    assert len(no_dped.experts) == 0 and count_params(no_dped) == 0
    model, no_dfed, _ = _method("sdes-no-dfed")
    images, labels = _batch()
    assert set(no_dfed.loss_terms(model(images), labels, StepInfo(0, 1))) == {"ss", "ss_experts", "dped"}
    _, rand, _ = _method("sdes-random-split")
    assert rand.opts.split == "random" and sorted(c for g in rand.groups for c in g) == [0, 1, 2, 3, 4]


def test_light_expert_has_about_001m_parameters_on_resnet18_cityscapes():
    # 1x1 conv 512->16 (no bias) + BN(16) + 1x1 conv 16->19 (+bias); 4 of them make the paper's Ens-T 15.94 M
    assert count_params(LightExpertDecoder(512, 19)) == 512 * 16 + 2 * 16 + 16 * 19 + 19  # 8547


# ----------------------------------------------------------------------------- options and CLI


@pytest.mark.parametrize("options,needle", [
    ({"gamma": 1.5}, "method.gamma=1.5 is out of range"),
    ({"n_experts": 12}, "method.n_experts=12 exceeds the dataset's 11 classes"),
    ({"expert": "huge"}, "method.expert must be one of light, student"),
    ({"isolate": [11]}, "method.isolate=[11]"),
])
def test_bad_options_are_config_errors(options, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        SDES.parse_options(options, num_classes=11)


def test_cli_bad_gamma_is_one_line():
    assert_one_line_error(run_cli("train", "--method", "sdes", "--set", "method.gamma=1.5"),
                          "method.gamma=1.5 is out of range")


def test_cli_train_sdes_records_ens_t(tmp_path):
    r = run_cli("train", "--method", "sdes", "--iters", "2", "--out", str(tmp_path), *FAST)
    assert r.returncode == 0, r.stderr
    rec = read_json(tmp_path / "results.json")
    assert rec["status"] == "completed" and set(rec["extra_metrics"]) == {"ens_t"}
    assert 0 <= rec["extra_metrics"]["ens_t"]["miou"] <= 1
    assert rec["params"] == count_params(build_model("deeplabv3_resnet18", 11))
    log = read_json_lines(tmp_path / "log.jsonl")
    assert {"ss", "ss_experts", "dped", "dfed"} <= set(log[-1])


def read_json_lines(path):
    import json
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name,extra", [("sdes-no-dfed", {"ens_t"}), ("sdes-no-dped", set()),
                                        ("sdes-random-split", {"ens_t"})])
def test_train_variants(tmp_path, name, extra):
    cfg = build_config({}, [f"method.name={name}", "train.iters=2", "data.batch_size=2", "data.crop=32",
                            "eval.max_images=4", f"output.dir={tmp_path}"])
    rec = train(cfg, show_progress=False).to_dict()
    assert rec["status"] == "completed" and set(rec["extra_metrics"]) == extra


@pytest.mark.skipif(not CAMVID.is_dir() or "camvid" not in DATASETS, reason="camvid dataset or data absent")
def test_train_sdes_on_camvid(tmp_path):
    r = run_cli("train", "--method", "sdes", "--dataset", "camvid", "--data-root", str(CAMVID), "--iters", "2",
                "--set", "method.tau=5", "--set", "method.n_experts=2", "--set", "method.expert=student",
                "--set", "data.batch_size=2", "--set", "data.crop=64", "--set", "eval.max_images=2",
                "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "ens_t" in read_json(tmp_path / "results.json")["extra_metrics"]
