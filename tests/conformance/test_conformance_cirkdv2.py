"""`cirkdv2` against the numbers winycg/CIRKD's CIRKD v2 loss modules produced on the same seeded inputs, its
channel queue as training state (created at the first step, carried by the state dict). Two gloo ranks
against one process are in tests/test_cirkd.py (they share its two spawned processes).

The fixture (cirkdv2.json) names the reference's repository, commit and paths, how its modules were run on a
CPU (the patches), how the three queues were filled, the input recipe (`reference_inputs.make_inputs`) and
what came back: every term times the script's lambda, each term's gradient with respect to the student's
feature (before the GCN) and logits, and the queues and pointers after the call. The project's method, with
the same weights, queues, pointers and RNG seed, must give the same terms to 1e-5 (relative), the same
gradients to 1e-5 of their absolute sum, the same pointers exactly and the same queues to 1e-5.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sdesbench.errors import SdesbenchError
from sdesbench.methods import METHODS
from sdesbench.methods.base import StepInfo
from test_conformance import close, fixture, inputs, method, project_options

FIXTURE = fixture("cirkdv2")
CASES = [pytest.param(c, id=c["name"]) for c in FIXTURE["cases"]]
TERMS = ("kd", "fitnet", "cirkd_batch", "cirkd_pixel", "cirkd_region", "channel_batch", "channel_memory",
         "channel_mse")


def sums(t: torch.Tensor) -> list[float]:
    """[float64 sum, float64 sum of value x flat index / numel]: what the fixture records of a queue."""
    t = t.detach().double()
    w = torch.arange(t.numel(), dtype=torch.float64).view_as(t) / t.numel()
    return [float(t.sum()), float((t * w).sum())]


def filled(case: dict, x: dict[str, torch.Tensor], options: dict | None = None):
    """The method with the fixture's weights, queues and pointers (the reference's were set alike)."""
    s_c, t_c = x["student"].shape[1], x["teacher"].shape[1]
    m = method("cirkdv2", {**project_options(case), **(options or {})}, num_classes=case["num_classes"],
               decoder_channels=s_c, teacher=SimpleNamespace(decoder_channels=t_c))
    with torch.no_grad():
        for name in ("node_k", "node_v", "node_q"):
            getattr(m.context, name).weight.copy_(x[f"gcn_{name}"])
        m.context.conv1[0].weight.copy_(x["gcn_conv1"])
        m.context.out_conv[0].weight.copy_(x["gcn_out_conv"])
        m.hint.weight.copy_(x["fitnet_conv"])
        for head, prefix in ((m.cirkd.projection, "pixel"), (m.channel_projection, "channel")):
            head[0].weight.copy_(x[f"{prefix}_projection_0"])
            head[3].weight.copy_(x[f"{prefix}_projection_3"])
        memory = m.cirkd.memory
        memory.pixel_queue.copy_(F.normalize(x["pixel_queue"], dim=2))
        memory.region_queue.copy_(F.normalize(x["region_queue"], dim=2))
        memory.pixel_ptr.copy_(torch.tensor(case["pixel_ptr"]))
        memory.region_ptr.copy_(torch.tensor(case["region_ptr"]))
        # the queue as a checkpoint would restore it (its width is set by the first step otherwise)
        m.channel_memory.load_state_dict({"queue": F.normalize(x["channel_queue"], dim=1),
                                          "ptr": torch.tensor(case["channel_ptr"])})
    return m


def run(m, x: dict[str, torch.Tensor], seed: int):
    size = x["labels"].shape[-2:]
    feature = x["student"].clone().requires_grad_(True)
    logits = x["student_logits"].clone().requires_grad_(True)
    up = lambda z: F.interpolate(z, size=size, mode="nearest")  # noqa: E731 - the 1/8 logits at the labels' size
    torch.manual_seed(seed)
    terms = m.loss_terms({"logits": up(logits), "aux": None, "decoder_feature": feature}, x["labels"],
                         StepInfo(0, 10), {"logits": up(x["teacher_logits"]), "decoder_feature": x["teacher"]})
    return terms, feature, logits


def test_the_fixture_names_the_reference_and_the_method_points_at_it():
    ref = FIXTURE["reference"]
    assert FIXTURE["method"] == "cirkdv2" and ref["repo"] == "winycg/CIRKD"
    assert re.fullmatch(r"[0-9a-f]{40}", ref["commit"])
    assert {"losses/cirkd_channel.py", "losses/gcn.py", "train_cirkdv2.py"} <= {p.strip() for p in ref["path"].split(",")}
    assert METHODS.get("cirkdv2").conformance == "cirkdv2.json"
    assert any(c["expected"]["channel_ptr"] == 0 for c in FIXTURE["cases"])  # a case where the queue wraps


@pytest.mark.parametrize("case", CASES)
def test_terms_gradients_queues_and_pointers_equal_the_reference(case):
    x = inputs(case)
    m = filled(case, x)
    terms, feature, logits = run(m, x, case["sampling_seed"])
    exp = case["expected"]
    assert set(terms) == {"ss", *TERMS} == {"ss", *METHODS.get("cirkdv2").logged_terms}
    for name in TERMS:
        close(terms[name], exp[name])
        grads = torch.autograd.grad(terms[name], [feature, logits], retain_graph=True, allow_unused=True)
        for leaf, g in zip(("student", "student_logits"), grads):
            expected = case["expected_gradients"].get(f"{name}/{leaf}")
            if expected is None:
                assert g is None or float(g.abs().sum()) == 0.0, f"{name}/{leaf}"
                continue
            got = sums(g) + [float(g.double().abs().sum())]
            assert got == pytest.approx(expected, abs=1e-5 * expected[2]), f"{name}/{leaf}"
    memory = m.cirkd.memory
    assert memory.pixel_ptr.tolist() == exp["pixel_ptr"] and memory.region_ptr.tolist() == exp["region_ptr"]
    assert int(m.channel_memory.ptr) == exp["channel_ptr"]
    for queue, key in ((memory.pixel_queue, "pixel_queue_sums"), (memory.region_queue, "region_queue_sums"),
                       (m.channel_memory.queue, "channel_queue_sums")):
        assert sums(queue) == pytest.approx(exp[key], rel=1e-5, abs=1e-5), key


# ----------------------------------------------------------------------------- the channel queue as state


def test_the_channel_queue_is_made_at_the_first_step_and_restored_by_a_state_dict():
    case = FIXTURE["cases"][0]
    x = inputs(case)
    opts = project_options(case)
    s_c, t_c = x["student"].shape[1], x["teacher"].shape[1]
    build = lambda: method("cirkdv2", opts, num_classes=case["num_classes"], decoder_channels=s_c,  # noqa: E731
                           teacher=SimpleNamespace(decoder_channels=t_c))
    m = build()
    assert tuple(m.channel_memory.queue.shape) == (opts["cirkdv2_channel_memory"], 0)
    run(m, x, 1)
    h, w = x["teacher"].shape[-2:]
    queue = m.channel_memory.queue
    assert tuple(queue.shape) == (opts["cirkdv2_channel_memory"], -(-h // 4) * -(-w // 4))
    assert torch.allclose(queue.norm(dim=1), torch.ones(len(queue)))
    assert int(m.channel_memory.ptr) == 2 * t_c  # the batch's 2 x C_T teacher channels went in
    fresh = build()
    fresh.load_state_dict(m.state_dict())  # what a resume does
    assert torch.equal(fresh.channel_memory.queue, queue) and int(fresh.channel_memory.ptr) == 2 * t_c
    smaller = {**x, "student": x["student"][..., :4], "teacher": x["teacher"][..., :4]}
    with pytest.raises(SdesbenchError, match="channel queue holds 4-position channels .* has 2 positions"):
        run(fresh, smaller, 1)


def test_without_the_hint_there_is_no_gcn_and_every_term_reads_the_raw_feature():
    case = FIXTURE["cases"][0]
    x = inputs(case)
    m = method("cirkdv2", {**project_options(case), "cirkdv2_hint_weight": 0.0}, num_classes=case["num_classes"],
               decoder_channels=x["student"].shape[1], teacher=SimpleNamespace(decoder_channels=x["teacher"].shape[1]))
    assert not hasattr(m, "context") and not hasattr(m, "hint")
    terms, _, _ = run(m, x, 1)
    assert "fitnet" not in terms and set(TERMS) - {"fitnet"} <= set(terms)
