"""The seeded input recipe of the conformance fixtures (tests/conformance/*.json).

A fixture case stores no tensors, only how to make them: a seed and an ordered list of specs.
`make_inputs` builds them with one CPU `torch.Generator` seeded with `seed`, drawing each tensor
in list order (float32):

- {"op": "randn", "shape": [...], "scale": s}   -> s * torch.randn(shape)          (s defaults to 1)
- {"op": "rand", "shape": [...]}                 -> torch.rand(shape)
- {"op": "labels", "shape": [...], "classes": C, "ignore_fraction": f}
      -> torch.randint(0, C, shape); then, when f > 0, a second draw torch.rand(shape) < f marks
         the pixels set to 255 (ignored)
- {"op": "add_onehot", "target": t, "labels": l, "scale": s}
      -> no draw: adds s to the logits `t` (B x C x H x W) at each labelled pixel's class of `l`
         (to make confident, "easy" pixels without a second random stream)

The same function produced the inputs the reference code was run on, so the reference's
recorded outputs and the project's functions see identical tensors. Each case also records, per
input, its float64 sum and first element (`checksums`): if a future torch changes its random
streams, `check_inputs` says so instead of reporting a loss mismatch.
"""
from __future__ import annotations

from typing import Any

import torch


def make_inputs(seed: int, specs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        shape = tuple(spec.get("shape", ()))
        op = spec["op"]
        if op == "randn":
            out[spec["name"]] = torch.randn(shape, generator=gen) * float(spec.get("scale", 1.0))
        elif op == "rand":
            out[spec["name"]] = torch.rand(shape, generator=gen)
        elif op == "labels":
            labels = torch.randint(0, int(spec["classes"]), shape, generator=gen)
            fraction = float(spec.get("ignore_fraction", 0.0))
            if fraction > 0:
                labels[torch.rand(shape, generator=gen) < fraction] = 255
            out[spec["name"]] = labels
        elif op == "add_onehot":
            labels = out[spec["labels"]]
            logits = out[spec["target"]]
            hot = torch.zeros_like(logits).scatter_(1, labels.clamp(max=logits.shape[1] - 1).unsqueeze(1), 1.0)
            out[spec["target"]] = logits + float(spec["scale"]) * hot * (labels != 255).unsqueeze(1)
        else:
            raise ValueError(f"unknown input op {op!r}")
    return out


def checksums(inputs: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per input: [float64 sum, first element] -- what a fixture records to pin the random stream."""
    return {name: [float(t.double().sum()), float(t.flatten()[0])] for name, t in inputs.items()}


def check_inputs(case: dict[str, Any], inputs: dict[str, torch.Tensor]) -> None:
    for name, (total, first) in case["checksums"].items():
        got_total, got_first = checksums({name: inputs[name]})[name]
        if abs(got_total - total) > 1e-4 * max(1.0, abs(total)) or abs(got_first - first) > 1e-6 * max(1.0, abs(first)):
            raise AssertionError(f"input {name!r} of case {case['name']!r} differs from the recorded one "
                                 f"(sum {got_total} vs {total}): torch's random stream changed, not the loss")
