"""`cirkd` against the numbers winycg/CIRKD's own loss modules produced on the same seeded inputs.

Same contract as test_conformance.py: the fixture (cirkd.json) names the reference's repository, commit,
paths and calls, how it was run on a CPU (the patches), how its queues were filled, the input recipe
(`reference_inputs.make_inputs`) and what the reference returned: the three loss terms, and after the call
its queues (two float64 checksums each) and write pointers. The project's method, with the options the
fixture names and the same queue contents, pointers and RNG seed, must give the same numbers to 1e-5
(relative) and the same pointers exactly.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from sdesbench.methods import METHODS
from sdesbench.methods.base import StepInfo
from test_conformance import close, fixture, inputs, method, project_options

FIXTURE = fixture("cirkd")
CASES = {c["name"]: c for c in FIXTURE["cases"]}
BATCH_CASES = [pytest.param(c, id=n) for n, c in CASES.items() if n.startswith("batch")]
MEMORY_CASES = [pytest.param(c, id=n) for n, c in CASES.items() if n.startswith("memory")]


def queue_checksums(queue: torch.Tensor) -> list[float]:
    """[float64 sum, float64 sum of value x flat index / numel]: what the fixture records of a queue."""
    q = queue.double()
    weights = torch.arange(q.numel(), dtype=torch.float64).view_as(q) / q.numel()
    return [float(q.sum()), float((q * weights).sum())]


def cirkd_for(case: dict, x: dict[str, torch.Tensor], options: dict | None = None):
    s_ch, t_ch = x["student"].shape[1], x["teacher"].shape[1]
    classes = case.get("num_classes", 2)
    opts = {**project_options(case), **(options or {})}
    return method("cirkd", opts, num_classes=classes, decoder_channels=s_ch,
                  teacher=SimpleNamespace(decoder_channels=t_ch)), classes


def run_terms(m, x: dict[str, torch.Tensor], classes: int, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    b = x["student"].shape[0]
    student = {"logits": torch.zeros(b, classes, *labels.shape[-2:]), "aux": None, "decoder_feature": x["student"]}
    return m.loss_terms(student, labels, StepInfo(0, 1), {"decoder_feature": x["teacher"]})


def filled(case: dict, x: dict[str, torch.Tensor], options: dict | None = None):
    """The method with the fixture's projection weights, queues and pointers (the reference's were set alike)."""
    m, classes = cirkd_for(case, x, options)
    terms, mem = m.cirkd, m.cirkd.memory
    with torch.no_grad():
        terms.projection[0].weight.copy_(x["projection_0"])
        terms.projection[3].weight.copy_(x["projection_3"])
        mem.pixel_queue.copy_(F.normalize(x["pixel_queue"], p=2, dim=2))
        mem.region_queue.copy_(F.normalize(x["region_queue"], p=2, dim=2))
        mem.pixel_ptr.copy_(torch.tensor(case["pixel_ptr"]))
        mem.region_ptr.copy_(torch.tensor(case["region_ptr"]))
    return m, classes


def test_the_fixture_names_the_reference_and_holds_every_case():
    assert {n.strip() for n in FIXTURE["method"].split(",")} == {"cirkd", "cirkd+kd"} <= set(METHODS.names())
    ref = FIXTURE["reference"]
    assert ref["repo"] == "winycg/CIRKD" and re.fullmatch(r"[0-9a-f]{40}", ref["commit"])
    assert "losses/cirkd_mini_batch.py" in ref["path"] and "losses/cirkd_memory.py" in ref["path"]
    assert ref["how_run"] and FIXTURE["matches_with"]
    assert {"batch_two_images", "batch_three_images_pooled", "memory_labels_at_twice_the_feature_size",
            "memory_more_pixels_than_enqueued"} <= set(CASES)
    for case in FIXTURE["cases"]:
        assert case["reference_call"] and case["expected"] and case["checksums"]


@pytest.mark.parametrize("case", BATCH_CASES)
def test_mini_batch_pixel_to_pixel_term_equals_cirkds(case):
    x = inputs(case)
    m, classes = cirkd_for(case, x, {"cirkd_pixel_memory": 16, "cirkd_region_memory": 2})
    labels = torch.zeros(x["student"].shape[0], *x["student"].shape[-2:], dtype=torch.long)
    close(run_terms(m, x, classes, labels)["cirkd_batch"], case["expected"]["cirkd_batch"])
    if "expected_at_newest_commit" in case:  # the newest commit's version gives the same number on small maps
        assert case["expected_at_newest_commit"]["cirkd_batch"] == pytest.approx(case["expected"]["cirkd_batch"],
                                                                                 rel=1e-6)


@pytest.mark.parametrize("case", MEMORY_CASES)
def test_memory_terms_queues_and_pointers_equal_cirkds(case):
    x = inputs(case)
    assert project_options(case)["cirkd_enqueue_from"] == "first_n_positions"
    m, classes = filled(case, x)
    torch.manual_seed(case["sampling_seed"])
    terms = run_terms(m, x, classes, x["labels"])
    exp = case["expected"]
    for name in ("cirkd_batch", "cirkd_pixel", "cirkd_region"):
        close(terms[name], exp[name])
    mem = m.cirkd.memory
    assert mem.pixel_ptr.tolist() == exp["pixel_ptr"] and mem.region_ptr.tolist() == exp["region_ptr"]
    assert queue_checksums(mem.pixel_queue) == pytest.approx(exp["pixel_queue_sums"], rel=1e-5)
    assert queue_checksums(mem.region_queue) == pytest.approx(exp["region_queue_sums"], rel=1e-5)


@pytest.mark.parametrize("case", MEMORY_CASES)
def test_the_default_enqueues_pixels_of_the_class_where_the_reference_takes_the_first_positions(case):
    # the same draws, the same pointers and region queue; the pixel queue differs (module docstring)
    x = inputs(case)
    m, classes = filled(case, x, {"cirkd_enqueue_from": "class_pixels"})
    assert METHODS.get("cirkd").Options().cirkd_enqueue_from == "class_pixels"
    torch.manual_seed(case["sampling_seed"])
    terms = run_terms(m, x, classes, x["labels"])
    exp, mem = case["expected"], m.cirkd.memory
    assert mem.pixel_ptr.tolist() == exp["pixel_ptr"] and mem.region_ptr.tolist() == exp["region_ptr"]
    assert queue_checksums(mem.region_queue) == pytest.approx(exp["region_queue_sums"], rel=1e-5)
    assert queue_checksums(mem.pixel_queue) != pytest.approx(exp["pixel_queue_sums"], rel=1e-3)
    close(terms["cirkd_batch"], exp["cirkd_batch"])  # the mini-batch term reads no queue
