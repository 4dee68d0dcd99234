"""`student`: the baseline, trained with the pixel-wise cross-entropy of Eq. 1 alone."""
from __future__ import annotations

from dataclasses import dataclass, field

from sdesbench.config import rng
from sdesbench.methods.base import METHODS, Method
from sdesbench.methods.losses import task_terms


@METHODS.register("student")
class Student(Method):
    """L = L_SS (Eq. 1). With an auxiliary head (model.aux) adds `aux_weight` x its CE."""
    logged_terms = ("ss",)
    conformance = None
    no_conformance_because = "plain cross-entropy (torch's own, checked in tests/test_selfkd.py)"
    option_prefix = ""

    @dataclass
    class Options:
        aux_weight: float = field(default=0.4, metadata=rng(0.0))

    def loss_terms(self, student_out, labels, step, teacher_out=None):
        return task_terms(student_out, labels, self.opts.aux_weight)
