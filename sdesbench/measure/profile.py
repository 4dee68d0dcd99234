"""Params and FLOPs of the paper's models, next to the figures the paper reports.

Counting follows the paper's convention: fvcore `FlopCountAnalysis` (one multiply-add = one FLOP;
BatchNorm in eval mode counts one FLOP per element and two with its affine part; bilinear upsampling
and adaptive pooling count; ReLU, max-pool, additions count nothing), the model in eval mode, batch 1,
without auxiliary heads. Params = every parameter of the model (trainable or not).

The paper's figures are from Table 2 (Cityscapes, 19 classes, FLOPs at 512x1024) and Table 3 /
"Results on CamVid" (11 classes, Params only). The "Ens-T" row is the ResNet-18 student plus the N = 4
light expert decoders of Table 2 (`sdesbench.models.experts.LightExpertDecoder`).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from sdesbench.errors import ConfigError
from sdesbench.models import MODELS, build_model, count_params
from sdesbench.models.experts import LightExpertDecoder

ENS_T = "ens_t_resnet18"
ENS_T_EXPERTS = 4


@dataclass(frozen=True)
class PaperFigures:
    model: str
    num_classes: int
    input_size: tuple[int, int]  # H, W at which the paper's FLOPs were measured
    params_m: float | None
    gflops: float | None


PAPER_ROWS: list[PaperFigures] = [
    PaperFigures("deeplabv3_resnet50", 19, (512, 1024), 39.64, 327.97),
    PaperFigures("deeplabv3_resnet18", 19, (512, 1024), 15.90, 134.08),
    PaperFigures(ENS_T, 19, (512, 1024), 15.94, 134.34),
    PaperFigures("erfnet", 19, (512, 1024), 2.07, 26.86),
    PaperFigures("esnet", 19, (512, 1024), 1.66, 24.35),
    PaperFigures("enet", 19, (512, 1024), 0.36, 4.35),
    PaperFigures("deeplabv3_mobilenetv2", 11, (512, 512), 12.65, None),
    PaperFigures("deeplabv3_efficientnet_b0", 11, (512, 512), 7.31, None),
]


class LogitsOnly(nn.Module):
    """Traces a SegmentationModel through its logits (fvcore cannot trace None / nested outputs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["logits"]


class EnsembleTeacher(nn.Module):
    """The SDES self-ensemble teacher as profiled in Table 2: the student (encoder + its decoder) and
    the expert decoders on the encoder's stages (routing pixels between them costs no FLOPs)."""

    def __init__(self, student: nn.Module, experts: nn.ModuleList):
        super().__init__()
        self.student = student
        self.experts = experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.student(x)
        return (out["logits"], *(e(out["stages"])["logits"] for e in self.experts))


def build_profiled(model: str, num_classes: int) -> nn.Module:
    """The network a profile row measures, in eval mode, returning tensors only."""
    if model == ENS_T:
        student = build_model("deeplabv3_resnet18", num_classes)
        experts = nn.ModuleList(LightExpertDecoder(student.stage_channels[-1], num_classes)
                                for _ in range(ENS_T_EXPERTS))
        net: nn.Module = EnsembleTeacher(student, experts)
    else:
        net = LogitsOnly(build_model(model, num_classes))
    return net.eval()


def count_gflops(net: nn.Module, input_size: tuple[int, int]) -> float:
    """fvcore FLOPs (multiply-adds) of one forward pass at batch 1, in units of 1e9."""
    logging.getLogger("fvcore").setLevel(logging.ERROR)  # skipped-op notices are expected (ReLU, add, ...)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation / tracer notices from fvcore's tracing
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(net, torch.zeros(1, 3, *input_size))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return analysis.total() / 1e9


def rel_diff(measured: float | None, paper: float | None) -> float | None:
    if measured is None or paper is None:
        return None
    return (measured - paper) / paper


def parse_size(text: str, option: str = "--input", multiple: int = 8) -> tuple[int, int]:
    """'HxW' -> (H, W), both at least 8 and multiples of `multiple` (profiling: 8, the output stride)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"{option}: expected HxW such as 512x1024, got {text!r}") from None
    if h < 8 or w < 8 or h % multiple or w % multiple:
        raise ConfigError(f"{option}: height and width must be multiples of {multiple} and at least 8, got {text!r}")
    return h, w


def profile_rows(model: str | None = None, input_size: tuple[int, int] | None = None,
                 num_classes: int | None = None, flops: bool = True) -> list[dict]:
    """One record per row of the paper's table (or the one `model`; a model outside the table gets
    19 classes at 512x1024 and no paper figures). `input_size` / `num_classes` override the row's."""
    rows = PAPER_ROWS
    if model is not None:
        rows = [r for r in PAPER_ROWS if r.model == model]
        if not rows:
            if model not in MODELS:
                MODELS.get(model)  # raises the one-line "unknown model" error with suggestions
            rows = [PaperFigures(model, 19, (512, 1024), None, None)]
    records = []
    for row in rows:
        size = input_size or row.input_size
        classes = num_classes or row.num_classes
        net = build_profiled(row.model, classes)
        params_m = count_params(net) / 1e6
        gflops = count_gflops(net, size) if flops else None
        same_setting = size == row.input_size and classes == row.num_classes
        paper_params = row.params_m if classes == row.num_classes else None
        paper_gflops = row.gflops if same_setting else None
        records.append({
            "model": row.model, "num_classes": classes, "input_size": list(size),
            "params_m": round(params_m, 4), "gflops": None if gflops is None else round(gflops, 4),
            "paper_params_m": paper_params, "paper_gflops": paper_gflops,
            "params_rel_diff": rel_diff(params_m, paper_params), "gflops_rel_diff": rel_diff(gflops, paper_gflops),
        })
    return records


def model_profile(model: str, num_classes: int, input_size: tuple[int, int] | list[int]) -> dict:
    """Params (M) and fvcore GFLOPs of one network at `input_size` with `num_classes` classes: the
    numbers `sdesbench profile --model M --classes C --input HxW --json` prints (the report's
    Params / FLOPs columns use this)."""
    (record,) = profile_rows(model, tuple(input_size), num_classes)
    return {"params_m": record["params_m"], "gflops": record["gflops"]}
