"""Shared base of the teacher-student methods (kl, at, cwd, rdd, rdd+kl, rdd+cwd).

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
import torch.nn.functional as F

from sdesbench.config import rng
from sdesbench.errors import ConfigError, SdesbenchError
from sdesbench.methods.base import Method
from sdesbench.methods.losses import pixel_ce


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
        terms = {"ss": pixel_ce(student_out["logits"], labels)}
        if student_out.get("aux") is not None:
            terms["aux"] = self.opts.aux_weight * pixel_ce(student_out["aux"], labels)
        return terms


def check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"method.{key}={value!r}: choose one of {', '.join(choices)}")


def resize_to(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a B x C x h x w map to `size` (a no-op when it already matches)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
