"""Shared base of the teacher-student methods (every registered method that subclasses it; those with a
discriminator through `adversarial.KDAdversarialMethod`).

Not a method itself (registers nothing). It fixes what every teacher-student method has in
common: it needs a trained teacher (`needs_teacher`, loaded frozen in eval mode by the Trainer
from `teacher.model` + `teacher.checkpoint`), it is not teacher-free (the paper's "TF" column),
the task term is the pixel-wise cross-entropy of Eq. 1 on the student's logits (plus
`aux_weight` x CE on the student's auxiliary head when it has one, as in `student`), and a
call without teacher outputs is an error rather than a silent fall-back to the student baseline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sdesbench.config import rng
from sdesbench.errors import SdesbenchError
from sdesbench.methods.base import Method
from sdesbench.methods.losses import task_terms


@dataclass
class TeacherStudentOptions:
    aux_weight: float = field(default=0.4, metadata=rng(0.0, doc="weight of the CE on the student's aux head"))


class TeacherStudentMethod(Method):
    needs_teacher = True
    teacher_free = False

    Options = TeacherStudentOptions

    def require_teacher(self, teacher_out: dict[str, Any] | None) -> dict[str, Any]:
        if teacher_out is None:
            raise SdesbenchError(f"method {self.name!r} was called without teacher outputs "
                                 "(set teacher.model and teacher.checkpoint)")
        return teacher_out

    def task_terms(self, student_out: dict[str, Any], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 1 on the student's logits (+ aux head), the same terms `student` uses."""
        return task_terms(student_out, labels, self.opts.aux_weight)
